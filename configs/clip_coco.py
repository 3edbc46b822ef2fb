"""CLIP dual encoder trained contrastively on COCO 2017 captions: jaxfit's main job.

Real COCO (``data.root`` holds ``annotations/captions_{train,val}2017.json``,
``train2017/``, ``val2017/``)::

  python -m jaxfit.train --config configs/clip_coco.py --workdir runs/clip \\
      --config.data.root=/data/coco

Fine-tune OpenAI's ViT-B/32 CLIP (HF directory or Hub name; fine-tuning learning rate)::

  python -m jaxfit.train --config configs/clip_coco.py:init_from=openai/clip-vit-base-patch32 \\
      --workdir runs/clip_ft --config.data.root=/data/coco

The embedded default (``make demo``): a small model on synthetic captioned shapes written
in COCO format into the workdir, a couple of minutes on a CPU::

  python -m jaxfit.train --config configs/clip_coco.py:demo --workdir runs/clip_demo

Your own images on a CPU in minutes (``small``: the demo's 2-layer, 64-wide towers on
64-pixel images, a 1,024-token BPE; measured on a 1,000-image Flickr8k sample in
docs/BENCHMARKS.md). A folder with ``captions.csv`` or ``captions.txt`` (columns
``image,caption``) and ``images/``; 5% of the images are held out for recall::

  python -m jaxfit.train --config configs/clip_coco.py:small --workdir runs/clip_small \\
      --config.data.format=csv --config.data.root=/data/flickr8k

Arguments (``:key=value,flag``): ``demo`` (bool), ``small`` (bool), ``init_from`` (str),
``steps`` (int, 0 = recipe default).
"""

from __future__ import annotations

import ml_collections

from jaxfit.config import default_lora_config, parse_arg, run_rhythm
from jaxfit.data.image_text import default_data_config
from jaxfit.optim import default_optim_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, demo=False, small=False, init_from="", steps=0)
    c = ml_collections.ConfigDict()
    c.task = "clip"
    # HF CLIP directory or Hub name to start from; "" trains from scratch with c.model.
    c.init_from = a.init_from

    # --- model (ignored when init_from is set, except remat_policy) --------------------
    # OpenAI ViT-B/32 shape (Radford et al. 2021, Table 20 / HF clip-vit-base-patch32).
    c.model = ml_collections.ConfigDict()
    c.model.projection_dim = 512
    c.model.remat_policy = "dots_no_batch"  # saves weight matmuls, recomputes attention
    c.model.text = ml_collections.ConfigDict(
        dict(
            hidden_size=512,
            intermediate_size=2048,
            num_hidden_layers=12,
            num_attention_heads=8,
            hidden_act="quick_gelu",
        )
    )
    c.model.vision = ml_collections.ConfigDict(
        dict(
            image_size=224,
            patch_size=32,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            hidden_act="quick_gelu",
        )
    )

    # --- data ---------------------------------------------------------------------------
    c.data = default_data_config()  # COCO 2017 captions layout; set data.root
    c.data.num_threads = 8
    c.data.vocab_size = 16384  # BPE trained on the train captions when not fine-tuning
    c.data.synthetic = ml_collections.ConfigDict(
        dict(enabled=False, num_train=1024, num_val=256, image_size=64, seed=0)
    )

    # --- batch: 16 images per micro-batch fit a 12 GB card for ViT-B/32 in bf16 with
    # remat; GradCache makes the 8 micro-batches one exact contrastive batch of 128.
    c.batch_size = 128
    c.micro_batch_size = 16
    # Similarities in blocks of this many rows (0 = the whole [batch, batch] at once;
    # jaxfit.losses.chunked_contrastive_loss): worth it from batches of ~16k, where the
    # float32 similarity matrix and its gradient reach GBs.
    c.loss_chunk_size = 0

    # --- optimisation: AdamW, warmup + cosine. From scratch: open_clip's ViT-B/32 lr 5e-4
    # with wd 0.2 (open_clip README, LAION runs); fine-tuning: 1e-5, wd 0.1.
    c.optim = default_optim_config()
    c.optim.lr = 1e-5 if a.init_from else 5e-4
    c.optim.weight_decay = 0.1 if a.init_from else 0.2
    c.optim.b2 = 0.98  # CLIP's beta2 (Radford et al. 2021, Table 19)
    c.optim.eps = 1e-6
    c.optim.warmup_steps = 500 if not a.init_from else 100
    c.optim.grad_clip_norm = 1.0

    c.lora = default_lora_config()  # lora.enabled=True: adapters over a frozen base
    c.lora.targets = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP's attention names

    # --- evaluation: recall@K on the val split (COCO val2017: 5,000 images, 25k captions)
    c.eval = ml_collections.ConfigDict(dict(batch_size=64, ks=(1, 5, 10), max_images=0))

    # COCO train2017: 118,287 images -> 924 steps of 128 per epoch; 10 epochs.
    run_rhythm(
        c,
        total_steps=a.steps or (3000 if a.init_from else 9240),
        log_every=50,
        eval_every=1000,
        ckpt_every=1000,
        precision="bf16",
    )

    if a.demo and a.small:
        raise ValueError("clip_coco: choose one of the arguments 'demo' and 'small'")
    if a.demo:
        _demo(c, a.steps)
    if a.small:
        _small(c, a.steps)
    return c


def _demo(c: ml_collections.ConfigDict, steps: int) -> None:
    """A small model on synthetic shapes: learns colour/shape/position words on a CPU."""
    c.data.synthetic.enabled = True
    c.data.root = ""  # -> WORKDIR/synthetic_coco
    c.data.vocab_size = 320  # 256 bytes + 3 specials + merges for the ~30 demo words
    c.data.context_length = 16
    _cpu_sized(c, steps or 300)


def _small(c: ml_collections.ConfigDict, steps: int) -> None:
    """The demo's model on your photos: 64-pixel images (8 x 8 patches of 8 pixels), a
    1,024-token BPE over captions of up to 32 tokens. On a 1,000-image Flickr8k sample
    (44 images held out) 200 steps of 64 take about 1.5 min of CPU; the held-out rsum
    (R@1+5+10 both ways) reaches twice chance by step 100 and stays there: more steps
    overfit 956 images (docs/BENCHMARKS.md, "The first hour")."""
    c.data.vocab_size = 1024
    c.data.context_length = 32  # Flickr8k / COCO captions: 10-20 words
    _cpu_sized(c, steps or 200)
    c.model.vision.image_size = 64
    c.eval_every = 100
    c.ckpt_every = 100


def _cpu_sized(c: ml_collections.ConfigDict, steps: int) -> None:
    """The model, optimisation and rhythm of the CPU sizes (demo, small): 2-layer, 64-wide
    towers, fp32, batches of 64, a larger learning rate and a short warmup."""
    c.data.num_threads = 2
    c.model.projection_dim = 64
    c.model.remat_policy = "none"
    c.model.text.update(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    c.model.vision.update(
        image_size=32,
        patch_size=8,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    c.batch_size = 64
    c.micro_batch_size = 32
    c.optim.lr = 1e-3
    c.optim.weight_decay = 0.05
    c.optim.warmup_steps = 20
    c.eval.batch_size = 128
    c.precision = "fp32"  # bf16 matmuls are emulated (slow) on most CPUs
    c.total_steps = steps
    c.log_every = 25
    c.eval_every = 150
    c.ckpt_every = 150
