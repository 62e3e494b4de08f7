"""A training script written for the original MadryLab datamodels, shaped like its CIFAR-10 example
(``examples/cifar10/train_cifar.py``): fastargs sections declared at import, ``@param`` getters, and
a ``main(index, logdir)`` that collects the command line itself. No training: the outputs are derived
from the options, so a test can tell which options reached the script.

Per model ``index``: ``masks`` bool [8] (a seeded half of 8 examples) and ``margins`` float32 [4] =
``[lr, epochs, len(train_dataset), scale * index * lr]``. ``scale`` is a keyword argument (our
``args.scale=``), to combine both ways of passing settings; the original calls ``main(index, logdir)``.
"""

from argparse import ArgumentParser

import numpy as np
from fastargs import Param, Section, get_current_config
from fastargs.decorators import param

Section("training", "Hyperparameters").params(
    lr=Param(float, "The learning rate to use", default=0.5),
    epochs=Param(int, "Number of epochs to run for", default=24),
)
Section("data", "data related stuff").params(
    train_dataset=Param(str, ".beton file to use for training", default="/mnt/cfs/datasets/cifar_ffcv/cifar_train.beton"),
)


@param("training.lr")
@param("training.epochs")
@param("data.train_dataset")
def train(index, scale, lr=None, epochs=None, train_dataset=None):
    return np.array([lr, epochs, len(train_dataset), scale * index * lr], dtype=np.float32)


def main(index, logdir, scale=1.0):
    config = get_current_config()
    parser = ArgumentParser(description="Fast CIFAR-10 training")
    config.augment_argparse(parser)
    config.collect_argparse_args(parser)
    config.validate(mode="stderr")
    config.summary()
    mask = np.random.default_rng(index).random(8) > 0.5
    return {"masks": mask, "margins": train(index, scale)}
