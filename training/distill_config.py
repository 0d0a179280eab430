"""`distill.*`: distillation from a teacher, online (a model run beside the student) or offline (its
embeddings stored next to the data). Kept apart from `training.config` so that module stays small;
the teacher itself is built in `training.distill`."""

from __future__ import annotations

from dataclasses import dataclass

from .config_checks import _default, _positives

__all__ = ["DistillConfig"]


@dataclass(frozen=True)
class DistillConfig:
    """The teacher and the weight of the distillation term added to the contrastive loss."""

    # Online: anything `vlm.load` takes (a preset, a save_pretrained or Hugging Face directory, an
    # open_clip name with `pretrained`); it is frozen and run in eval mode on the student's inputs.
    model: str | None = None
    pretrained: str | None = None
    # Offline: a directory of the teacher's embeddings in clip-retrieval's layout,
    # img_emb/img_emb_{0,1,...}.npy and text_emb/text_emb_{0,1,...}.npy, whose rows, shards taken in
    # order, are the rows of data.train (`training.distill.write_teacher_embeddings` writes it).
    embeddings: str | None = None
    # The offline teacher's temperature exp(logit_scale); None reads it from the directory's teacher.json.
    logit_scale: float | None = None
    # open_clip adds the distillation term with weight 1.
    weight: float = 1.0

    def __post_init__(self) -> None:
        _positives(self, "distill", ("weight",))
        if self.model and self.embeddings:
            raise ValueError(
                f"distill.model ({self.model}) and distill.embeddings ({self.embeddings}) are both set; give one: "
                "a teacher run beside the student, or its stored embeddings"
            )
        needs = {"pretrained": "model", "logit_scale": "embeddings"}
        for key in ("pretrained", "logit_scale", "weight"):
            value = getattr(self, key)
            owner = needs.get(key)
            missing = not getattr(self, owner) if owner else not self.enabled
            if value != _default(DistillConfig, key) and missing:
                fix = f"distill.{owner}" if owner else "distill.model or distill.embeddings"
                raise ValueError(f"distill.{key}={value!r} needs a teacher; set {fix}, or drop distill.{key}")
        if self.logit_scale is not None:
            _positives(self, "distill", ("logit_scale",))

    @property
    def enabled(self) -> bool:
        """Whether a teacher is set."""
        return bool(self.model or self.embeddings)
