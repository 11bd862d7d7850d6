"""The fine-tuning baseline."""

from lifelong.methods.base import ContinualMethod


class Finetune(ContinualMethod):
    """Fine-tuning: each task trains from the previous task's weights with no protection (the lower bound)."""

    name = "finetune"
