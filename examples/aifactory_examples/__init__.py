"""Small real workloads for aifactory: the programs ``manifests/samples/`` name.

Training (PyTorch; the workers need ``torch``, serving does not):

* ``train:main``     DDP on synthetic data (gloo on CPU, NCCL on GPUs), checkpoint and resume
* ``finetune:main``  the same model from a pretrained checkpoint (``PRETRAINED``) on a new task
* ``sweep:main``     a few learning rates, one after another, resumable between and within
* ``python -m aifactory_examples.moe``  a tiny mixture-of-experts layer, run as a command

Inference (HTTP, numpy or pure Python, counting requests in flight):

* ``python -m aifactory_examples.serve``  a character trigram language model
* ``python -m aifactory_examples.embed``  hashed n-gram features through a seeded projection

Entrypoints are called by the Ray worker with its context (``rank``, ``world_size``,
``checkpoint_dir``, ``latest_checkpoint``, ``report(...)``, ``should_stop``); commands get the
same through the environment (``aifactory_examples.context``). ``AIFACTORY_FAST=1``
(``aifactory run --fast``) cuts every example's steps for a quick demo.
"""
