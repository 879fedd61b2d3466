"""Deterministic tiny random encoders in Hugging Face layout, for CPU demos and tests.

    python -m ediffi_jax.encoders.tiny --out runs/encoders [--width 32 --seed 0]

writes `t5/` (a T5 v1.1-style gated-GELU encoder with a SentencePiece tokenizer the project
trains on the built-in captions' words, T5's id layout: pad 0, eos 1, unk 2) and `clip/` (a
CLIPModel checkpoint: text and vision towers with projections, OpenAI's real BPE vocabulary).
The weights are random (seeded numpy), so the same command gives the same bytes; the real
loader reads them, so demos and tests exercise the real code path end to end.
Use them with `--config.encoders.t5=runs/encoders/t5 --config.encoders.clip_text=runs/encoders/clip
--config.encoders.clip_vision=runs/encoders/clip`.
"""
from __future__ import annotations

import argparse
import io
import math
import os
import sys
import tempfile

import numpy as np
from ediffi_jax.encoders import clip, hf, t5
from ediffi_jax.encoders.tokenizers import _quiet_transformers, clip_tokenizer

# The words of the built-in datasets' captions plus common English, for the tokenizer to learn.
_CORPUS_WORDS = (
    "a an the of in on at with and or to is are small large big tiny medium red green blue yellow "
    "cyan magenta white black orange purple pink brown grey gray circle square triangle star ring "
    "cross heart shape shapes object objects top bottom left right centre center middle corner two "
    "three four one photo picture painting drawing image of cat dog person man woman tree house car "
    "sky sea mountain flower style watercolor oil sketch digital art emoji face hand shirt trouser "
    "pullover dress coat sandal sneaker bag ankle boot digit zero five six seven eight nine"
).split()


def train_sentencepiece(vocab_size: int = 256, seed: int = 0) -> bytes:
    """A small unigram SentencePiece model with T5's special ids (pad 0, eos 1, unk 2)."""
    import sentencepiece as spm

    rng = np.random.default_rng(seed)
    sentences = [" ".join(rng.choice(_CORPUS_WORDS, size=int(rng.integers(3, 9))))
                 for _ in range(2000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1,
        hard_vocab_limit=False, minloglevel=2)
    return model.getvalue()


def random_params(abstract, seed: int):
    """Random params in which every tensor matters: weights ~ N(0, 1/fan_in), norm scales near
    1, small biases; embeddings ~ N(0, 1)."""
    import jax

    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return (1 + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
        if leaf.ndim == 1 or "bias" in name.split("'")[-2]:
            return (0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
        fan_in = 1 if "embedding" in name else math.prod(leaf.shape[:-1])
        return (rng.standard_normal(leaf.shape) / math.sqrt(fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def _tokenizer_files(tokenizer) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {n: open(os.path.join(tmp, n), "rb").read() for n in os.listdir(tmp)}


def write_t5(out: str, width: int = 32, layers: int = 2, heads: int = 4, seed: int = 0) -> None:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    _quiet_transformers()
    from transformers import T5Tokenizer

    spiece = train_sentencepiece(seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "spiece.model"), "wb") as f:
            f.write(spiece)
        tokenizer = T5Tokenizer.from_pretrained(tmp, extra_ids=0)
    hf_config = dict(
        architectures=["T5EncoderModel"], model_type="t5", vocab_size=len(tokenizer),
        d_model=width, d_kv=width // heads, d_ff=2 * width, num_layers=layers, num_heads=heads,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, is_encoder_decoder=False,
        pad_token_id=0, eos_token_id=1, dropout_rate=0.0,
    )
    cfg = t5.T5Config.from_hf(hf_config)
    module = t5.T5Encoder(cfg)
    ids = jnp.zeros((1, 4), jnp.int32)
    abstract = jax.eval_shape(lambda: nn.meta.unbox(module.init(jax.random.key(0), ids))["params"])
    params = random_params(abstract, seed)
    files = _tokenizer_files(tokenizer)
    files["spiece.model"] = spiece
    hf.save(out, hf.to_hf_tensors(params, t5.hf_names(cfg)), hf_config, files)


def write_clip(out: str, width: int = 32, layers: int = 2, heads: int = 4, projection: int = 32,
               image_size: int = 32, patch_size: int = 4, seed: int = 0) -> None:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    tokenizer = clip_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=49406,
                eos_token_id=49407, pad_token_id=49407)
    vision = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                  num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
                  num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    hf_config = dict(architectures=["CLIPModel"], model_type="clip", projection_dim=projection,
                     text_config=text, vision_config=vision)
    tcfg = clip.CLIPTextConfig.from_hf(hf_config)
    vcfg = clip.CLIPVisionConfig.from_hf(hf_config)
    ids = jnp.zeros((1, 4), jnp.int32)
    pixels = jnp.zeros((1, image_size, image_size, 3))
    t_abs = jax.eval_shape(
        lambda: nn.meta.unbox(clip.CLIPTextTower(tcfg).init(jax.random.key(0), ids))["params"])
    v_abs = jax.eval_shape(
        lambda: nn.meta.unbox(clip.CLIPVisionTower(vcfg).init(jax.random.key(0), pixels))["params"])
    tensors = {**hf.to_hf_tensors(random_params(t_abs, seed), clip.text_hf_names(tcfg)),
               **hf.to_hf_tensors(random_params(v_abs, seed + 1), clip.vision_hf_names(vcfg))}
    files = _tokenizer_files(tokenizer)
    files["preprocessor_config.json"] = (
        '{"image_processor_type": "CLIPImageProcessor", "do_resize": true, "size": {"shortest_edge": '
        f'{image_size}}}, "do_center_crop": true, "crop_size": {{"height": {image_size}, "width": '
        f'{image_size}}}, "resample": 3, "do_rescale": true, "rescale_factor": 0.00392156862745098, '
        f'"do_normalize": true, "image_mean": {list(clip.CLIP_MEAN)}, "image_std": {list(clip.CLIP_STD)}}}\n')
    hf.save(out, tensors, hf_config, files)


def write_tiny_encoders(out: str, width: int = 32, seed: int = 0) -> dict[str, str]:
    """Both encoders under `out`; returns the `encoders` config section that uses them."""
    os.makedirs(out, exist_ok=True)
    write_t5(os.path.join(out, "t5"), width=width, seed=seed)
    write_clip(os.path.join(out, "clip"), width=width, projection=width, seed=seed)
    clip_dir = os.path.join(out, "clip")
    return {"t5": os.path.join(out, "t5"), "clip_text": clip_dir, "clip_vision": clip_dir}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ediffi_jax.encoders.tiny", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--width", type=int, default=32, help="hidden size of every tower")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    section = write_tiny_encoders(args.out, args.width, args.seed)
    print(" ".join(f"--config.encoders.{k}={v}" for k, v in section.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
