"""Time per training step: the JAX model (jitted, after compilation) against the same architecture in
PyTorch eager, on the same batch, the same weights and the same CPU threads, optimizer step included.

The PyTorch model is assembled here from transformers modules (`Phi3ForCausalLM`, `SiglipVisionModel`,
`BertModel`) and a few small torch modules written below (M3D-CLIP's 3D ViT, the connectors, TG-IS),
under the authors' module paths, so that the JAX weights load into it through the project's own export
table. Before timing, both sides compute the loss of the same batch without dropout: the two figures
must agree, which shows that the two sides compute the same thing.

The JAX step applies the LM head to its slots (`models/lm_loss.py`: the supervised positions first, a
static number of them per row from the config), as a training step needs; transformers'
`Phi3ForCausalLM` computes the logits of every position, as the authors' training does. That is the
largest single difference at the tiny config, where the head (128 x 32064) outweighs the rest of the
LLM; the script prints the head's share of the step's FLOPs at the tiny and at the released size.

Both sides train what the stage trains (the finetune stage by default: LLM, SigLIP, connectors, TG-IS;
M3D-CLIP's ViT and BERT frozen and run without gradients), with AdamW after clipping the gradient norm.
The JAX and PyTorch steps are timed in alternating rounds so that a busy machine slows both alike.

    python benchmarks/bench_train_step.py                    # tiny config, finetune, batch 8, 2 threads
    python benchmarks/bench_train_step.py --peak_flops=9.9e14 --skip_torch   # MFU on an accelerator

The last line is `RESULT jax=<s/step> torch=<s/step> ratio=<torch/jax>`.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import statistics
import sys
import time

import numpy as np

from med2e3_jax.random_batches import benchmark_batch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny.py:finetune", help="config file:stage")
    parser.add_argument("--batch_size", type=int, default=0, help="default: config.train.global_batch_size")
    parser.add_argument("--micro_batches", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per side")
    parser.add_argument("--rounds", type=int, default=4, help="alternating JAX / PyTorch rounds")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for both sides")
    parser.add_argument("--dtype", default="float32", help="JAX compute dtype (float32 or bfloat16)")
    parser.add_argument("--remat_policy", default="none")
    parser.add_argument("--peak_flops", type=float, default=0.0, help="device peak FLOP/s, for MFU")
    parser.add_argument("--skip_torch", action="store_true", help="time the JAX step only")
    return parser.parse_args()


def load_config(spec: str):
    path, _, stage = spec.partition(":")
    module_name = os.path.splitext(os.path.relpath(path))[0].replace(os.sep, ".")
    module = importlib.import_module(module_name)
    return module.get_config(stage) if stage else module.get_config()


def head_share_configs(config, batch):
    """{name: (config, batch)}: the benchmarked config and the released model at the authors' finetune."""
    from configs import med2e3_m3d

    released = med2e3_m3d.get_config("finetune")
    return {"this config": (config, batch), "released model": (released, benchmark_batch(released, 2))}


def head_share(config, batch) -> tuple[float, float]:
    """(the LM head's share of `model_flops` with the head on the supervised positions, its share with the
    head on the slots the step's layout computes: at least `head_slots_per_row` a row)."""
    from data_pipelines.image_placeholder import IGNORE_INDEX
    from med2e3_jax.flops import model_flops_by_part
    from med2e3_jax.models.lm_loss import resolve_slots_per_row

    parts = model_flops_by_part(config.model, batch, set(config.train.trainable))
    rows, length = batch["labels"].shape
    targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    per_row = resolve_slots_per_row(config.train.head_slots_per_row, length)
    computed = parts["lm_head"] * max(rows * per_row, targets) / max(targets, 1)
    total = sum(parts.values())
    return parts["lm_head"] / total, computed / (total - parts["lm_head"] + computed)


# ----------------------------------------------------------------------------------------------------
# PyTorch: the same architecture, under the authors' module paths.


def build_torch_model(cfg):
    import torch
    import transformers
    from torch import nn

    class Connector(nn.Module):
        def __init__(self, in_dim, out_dim):
            super().__init__()
            self._connector = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

        def forward(self, x):
            return self._connector(x)

    class Vision3DConnector(Connector):
        def __init__(self, in_dim, out_dim, question_dim):
            super().__init__(in_dim, out_dim)
            self.text_mlp = nn.Linear(question_dim, out_dim)

    class PatchEmbedding(nn.Module):
        """monai's 'perceptron' patch embedding: Rearrange (item 0) then Linear (item 1)."""

        def __init__(self, v):
            super().__init__()
            self.patch = tuple(v.patch_size)
            grid = [s // p for s, p in zip(v.img_size, v.patch_size)]
            patch_dim = v.in_channels * int(np.prod(v.patch_size))
            self.patch_embeddings = nn.Sequential(nn.Identity(), nn.Linear(patch_dim, v.hidden_size))
            self.position_embeddings = nn.Parameter(torch.zeros(1, int(np.prod(grid)), v.hidden_size))

        def forward(self, x):
            b, c, d, h, w = x.shape
            pd, ph, pw = self.patch
            x = x.reshape(b, c, d // pd, pd, h // ph, ph, w // pw, pw).permute(0, 2, 4, 6, 3, 5, 7, 1)
            x = x.reshape(b, (d // pd) * (h // ph) * (w // pw), pd * ph * pw * c)
            return self.patch_embeddings(x) + self.position_embeddings

    class Attention(nn.Module):
        def __init__(self, v):
            super().__init__()
            self.heads = v.num_heads
            self.qkv = nn.Linear(v.hidden_size, 3 * v.hidden_size, bias=False)
            self.out_proj = nn.Linear(v.hidden_size, v.hidden_size)

        def forward(self, x):
            b, n, d = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return self.out_proj(out.transpose(1, 2).reshape(b, n, d))

    class Block(nn.Module):
        def __init__(self, v):
            super().__init__()
            self.norm1, self.attn = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps), Attention(v)
            self.norm2 = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)
            self.mlp = nn.Module()
            self.mlp.linear1, self.mlp.linear2 = nn.Linear(v.hidden_size, v.mlp_dim), nn.Linear(v.mlp_dim, v.hidden_size)

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.mlp.linear2(torch.nn.functional.gelu(self.mlp.linear1(self.norm2(x))))

    class ViT3D(nn.Module):
        """M3D-CLIP's monai ViT; returns the last block's output (before the final norm) without CLS."""

        def __init__(self, v):
            super().__init__()
            self.patch_embedding = PatchEmbedding(v)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, v.hidden_size))
            self.blocks = nn.ModuleList(Block(v) for _ in range(v.num_layers))

        def forward(self, volume):
            x = self.patch_embedding(volume)
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
            for block in self.blocks:
                x = block(x)
            return x[:, 1:]

    class Med2E3Torch(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            llm, v2, v3, q = cfg.llm, cfg.vision2d, cfg.vision3d, cfg.question_encoder
            rope = dict(llm.rope_scaling)
            self.llm = transformers.Phi3ForCausalLM(transformers.Phi3Config(
                vocab_size=llm.vocab_size, hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
                num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_heads,
                num_key_value_heads=llm.num_kv_heads, rms_norm_eps=llm.rms_norm_eps,
                max_position_embeddings=llm.max_position_embeddings,
                original_max_position_embeddings=rope["original_max_position_embeddings"],
                rope_parameters=dict(rope_theta=llm.rope_theta, type="longrope", short_factor=rope["short_factor"],
                                     long_factor=rope["long_factor"]),
                tie_word_embeddings=False, bos_token_id=llm.bos_token_id, eos_token_id=llm.eos_token_id,
                pad_token_id=llm.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
            ))
            self.vision2d_model = nn.Module()
            self.vision2d_model.vision2d_encoder = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
                hidden_size=v2.hidden_size, intermediate_size=v2.intermediate_size, num_hidden_layers=v2.num_layers,
                num_attention_heads=v2.num_heads, image_size=v2.image_size, patch_size=v2.patch_size,
                num_channels=v2.num_channels, layer_norm_eps=v2.layer_norm_eps,
            ))
            self.vision2d_connector = Connector(v2.hidden_size, llm.hidden_size)
            self.vision3d_model = nn.Module()
            self.vision3d_model.vision3d_encoder = nn.Module()
            self.vision3d_model.vision3d_encoder.vision_encoder = ViT3D(v3)
            self.vision3d_model.vision3d_encoder.language_encoder = transformers.BertModel(transformers.BertConfig(
                vocab_size=q.vocab_size, hidden_size=q.hidden_size, num_hidden_layers=q.num_layers,
                num_attention_heads=q.num_heads, intermediate_size=q.intermediate_size,
                max_position_embeddings=q.max_position_embeddings, type_vocab_size=q.type_vocab_size,
                layer_norm_eps=q.layer_norm_eps, hidden_act=q.hidden_act,
            ))
            self.vision3d_connector = Vision3DConnector(v3.hidden_size, llm.hidden_size, q.hidden_size)
            self.grid = [s // p for s, p in zip(v3.img_size, v3.patch_size)]
            self.stride, self.temperature = cfg.tgis.pool_stride, cfg.tgis.temperature
            self.score_dropout = nn.Dropout(cfg.tgis.dropout)

        def forward(self, volume, input_ids, attention_mask, labels, question_ids, question_mask):
            encoders = self.vision3d_model.vision3d_encoder
            with torch.no_grad():  # frozen in both stages
                features = encoders.vision_encoder(volume)
                question = encoders.language_encoder(question_ids, attention_mask=question_mask).pooler_output
            b, _, d3 = features.shape
            cube = features.transpose(1, 2).reshape(b, d3, *self.grid)
            pooled = torch.nn.functional.avg_pool3d(cube, self.stride, self.stride).flatten(2).transpose(1, 2)
            volume_tokens = self.vision3d_connector(pooled)

            slices = volume.shape[2]
            images = volume[:, 0].reshape(b * slices, 1, *volume.shape[3:]).expand(-1, 3, -1, -1)
            siglip = self.vision2d_model.vision2d_encoder
            hidden = siglip.encoder(inputs_embeds=siglip.embeddings(images)).last_hidden_state
            slice_tokens = self.vision2d_connector(hidden).reshape(b, slices, hidden.shape[1], -1)

            # TG-IS: key of slice j = mean over [its depth group's 3D tokens ; its slice tokens].
            groups = self.grid[0] // self.stride
            group_tokens = volume_tokens.reshape(b, groups, -1, volume_tokens.shape[-1])
            keys = torch.cat([group_tokens.repeat_interleave(slices // groups, dim=1), slice_tokens], dim=2).mean(2)
            logits = torch.einsum("bsd,bd->bs", keys, self.vision3d_connector.text_mlp(question)) / self.temperature
            scores = self.score_dropout(torch.softmax(logits, dim=1))
            aggregated = torch.einsum("bs,bsld->bld", scores, slice_tokens)
            vision = torch.cat([volume_tokens, aggregated], dim=1)

            is_vision = input_ids == -201
            embeds = self.llm.model.embed_tokens(torch.where(is_vision, 0, input_ids))
            index = (is_vision.cumsum(1) - 1).clamp(0, vision.shape[1] - 1)
            gathered = torch.gather(vision, 1, index[..., None].expand(-1, -1, vision.shape[-1]))
            embeds = torch.where(is_vision[..., None], gathered, embeds) * attention_mask[..., None]
            return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels).loss

    return Med2E3Torch(cfg)


def load_jax_weights(torch_model, jax_model):
    """The JAX weights into the torch model through the project's export table (authors' key names)."""
    import torch

    from med2e3_jax.checkpoint.importer import export_pytorch
    from med2e3_jax.checkpoint.med2e3_port import FULL_TABLE

    exported = export_pytorch(jax_model, FULL_TABLE)
    # transformers 5 SiglipVisionModel has no `vision_model.` level.
    exported = {k.replace("vision2d_encoder.vision_model.", "vision2d_encoder."): torch.from_numpy(np.array(v))
                for k, v in exported.items()}
    missing, unexpected = torch_model.load_state_dict(exported, strict=False)
    unused = ("post_layernorm", ".head.", "rotary_emb")  # computed by HF, discarded by Med-2E3; buffers
    missing = [k for k in missing if not any(u in k for u in unused)]
    if missing or unexpected:
        raise RuntimeError(f"torch model: missing {missing}, unexpected {unexpected}")


def main():
    args = parse_args()
    import jax

    import torch

    torch.set_num_threads(args.threads)
    from flax import nnx

    from med2e3_jax.models.med2e3 import Med2E3
    from med2e3_jax.train import state as train_state
    from med2e3_jax.train import step as train_step_lib

    config = load_config(args.config)
    config.model.dtype = args.dtype
    config.model.remat_policy = args.remat_policy
    batch_size = args.batch_size or config.train.global_batch_size
    batch = benchmark_batch(config, batch_size)
    inputs = {k: batch[k] for k in train_step_lib.MODEL_INPUTS}
    tokens = int(batch["attention_mask"].sum())

    model = Med2E3(config.model, rngs=nnx.Rngs(0))
    if not args.skip_torch:
        torch_model = build_torch_model(config.model)
        load_jax_weights(torch_model, model)
        torch_inputs = {k: torch.from_numpy(np.asarray(v).astype(np.int64 if v.dtype.kind == "i" else np.float32))
                        for k, v in inputs.items()}
        torch_model.eval()
        with torch.no_grad():
            torch_loss = float(torch_model(**torch_inputs))
        jax_loss = float(train_step_lib.eval_step(model, inputs)["loss"])
        print(f"same weights, no dropout: loss jax {jax_loss:.6f} torch {torch_loss:.6f} "
              f"(|diff| {abs(jax_loss - torch_loss):.2e})")
        torch_model.train()
        torch_model.vision3d_model.eval()  # frozen encoders run as at inference (no BERT dropout), as in JAX
        trainable_names = tuple(config.train.trainable)
        prefixes = {"llm": ("llm.",), "vision2d": ("vision2d_model.",), "vision2d_connector": ("vision2d_connector.",),
                    "vision3d_connector": ("vision3d_connector._connector",), "tgis": ("vision3d_connector.text_mlp",)}
        trainable = []
        for name, param in torch_model.named_parameters():
            train = any(name.startswith(p) for t in trainable_names for p in prefixes[t])
            param.requires_grad_(train)
            if train:
                trainable.append(param)
        t = config.train
        torch_opt = torch.optim.AdamW(trainable, lr=t.learning_rate, betas=(t.adam_b1, t.adam_b2), eps=t.adam_eps,
                                      weight_decay=t.weight_decay)
        warmup = train_state.warmup_steps(t)

        def lr_factor(step):  # HF get_cosine_schedule_with_warmup, as train/state.py
            if step < warmup:
                return step / max(1, warmup)
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, t.steps - warmup))))

        scheduler = torch.optim.lr_scheduler.LambdaLR(torch_opt, lr_factor)

        def torch_step():
            loss = torch_model(**torch_inputs)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, t.grad_clip)
            torch_opt.step()
            scheduler.step()
            torch_opt.zero_grad(set_to_none=True)
            return loss.item()

    optimizer = train_state.make_optimizer(model, config.train)
    key = jax.random.key(0)
    jax_inputs = jax.device_put(inputs)

    step = train_step_lib.make_train_step(model, optimizer, micro_batches=args.micro_batches,
                                          head_slots_per_row=config.train.head_slots_per_row,
                                          head_chunk=config.train.head_chunk)

    def jax_step():
        return float(step(jax_inputs, key)["loss"])  # waits for the step

    start = time.perf_counter()
    jax_step()
    print(f"jax compile + first step: {time.perf_counter() - start:.1f} s")
    compiled = train_step_lib.lower_train_step(
        model, optimizer, jax_inputs, key, micro_batches=args.micro_batches,
        head_slots_per_row=config.train.head_slots_per_row, head_chunk=config.train.head_chunk,
    ).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    if not args.skip_torch:
        torch_step()  # warm-up (allocator, thread pool)

    jax_times, torch_times = [], []
    per_round = max(1, args.steps // args.rounds)
    for _ in range(args.rounds):
        for _ in range(per_round):
            start = time.perf_counter()
            jax_step()
            jax_times.append(time.perf_counter() - start)
        if not args.skip_torch:
            for _ in range(per_round):
                start = time.perf_counter()
                torch_step()
                torch_times.append(time.perf_counter() - start)

    jax_s = statistics.median(jax_times)
    torch_s = statistics.median(torch_times) if torch_times else float("nan")
    print(f"config {args.config}, stage {config.train.stage}, batch {batch_size} x {inputs['input_ids'].shape[1]} "
          f"tokens ({tokens} real), volume {tuple(batch['volume'].shape[1:])}, dtype {args.dtype}, "
          f"remat {args.remat_policy}, micro_batches {args.micro_batches}")
    print(f"devices: jax {jax.devices()[0].platform} x{jax.device_count()}, torch threads {torch.get_num_threads()}, "
          f"cpu cores {os.cpu_count()}")
    print(f"jax   {jax_s * 1e3:8.1f} ms/step (median of {len(jax_times)}, min {min(jax_times) * 1e3:.1f})")
    if torch_times:
        print(f"torch {torch_s * 1e3:8.1f} ms/step (median of {len(torch_times)}, min {min(torch_times) * 1e3:.1f})")
    from med2e3_jax.flops import model_flops

    analytic = model_flops(config.model, batch, set(config.train.trainable))
    for name, (cfg, head_batch) in head_share_configs(config, batch).items():
        share, computed = head_share(cfg, head_batch)
        print(f"LM head share of the model FLOPs, {name}: {share:.2%} on the supervised positions, {computed:.2%} "
              f"on the slots the step computes (train.head_slots_per_row={cfg.train.head_slots_per_row})")
    print(f"model FLOPs per step: {analytic:.3e} (from the config; see model_flops), "
          f"achieved {analytic / jax_s:.3e} FLOP/s")
    print(f"XLA cost analysis of the compiled step: {flops:.3e} FLOPs (every op, elementwise included, and "
          f"any remat recomputation)")
    if args.peak_flops:
        print(f"MFU {analytic / jax_s / args.peak_flops:.2%} of {args.peak_flops:.3e} FLOP/s")
    print(f"RESULT jax={jax_s:.5f} torch={torch_s:.5f} ratio={torch_s / jax_s:.2f}")


if __name__ == "__main__":
    main()
