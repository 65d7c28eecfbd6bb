"""The Fashion-MNIST CPU recipe (configs/fashion_mnist.py) made class-conditional, with
classifier-free guidance (Ho & Salimans 2022): the ten garment classes, labels dropped to "no
class" 10 % of the time in training, so one network is both models.

    python -m diffusion_jax.main --config configs/fashion_mnist_cond.py \
        --workdir runs/fashion_mnist_cond

Sample i is of class i mod 10 (``sampling.class_label = -1``), so a grid of 10 columns has one
class per column; ``class_match`` is the share the classifier assigns to the requested class.
Not trained yet (experiments/fashion_mnist/README.md).
"""

from configs import fashion_mnist


def get_config():
    config = fashion_mnist.get_config()
    config.model.num_classes = 10
    config.training.label_dropout = 0.1
    config.sampling.guidance_scale = 0.5  # digits_cond's weight; not yet measured here
    config.eval.metrics = (*config.eval.metrics, "class_match")
    return config
