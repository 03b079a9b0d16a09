"""Train the reference CIFAR-10 ConvNet under DataParallel, DDP or DeepSpeed (run with ``python -m train``)."""
