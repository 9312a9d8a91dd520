"""Fine-tune a ResNet on breast ultrasound (BUSI or a synthetic stand-in) and
watch CAManim during training.  Run ``python examples/finetune_bus/train.py --help``."""
