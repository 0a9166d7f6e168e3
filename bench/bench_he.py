"""Benchmark: zenfed packed CKKS vs NVFlare's stock HE path, on SmolLM2-135M LoRA updates.

Prints one JSON object. Both paths run side by side in one process on the same
updates. Stock: ``nvflare.app_opt.he.model_encryptor.HEModelEncryptor`` with the
stock provisioning context (``HEBuilder`` defaults: N=8192, [60, 40, 40], scale
2^40), serialised as FLARE sends a task result (``Shareable.to_bytes``, fobs).
zenfed: the sealed envelope a site uploads (header + packed, seeded ciphertexts);
``zenfed_sum_bytes`` is the encrypted sum the server sends back (not seeded).

Run: ``python bench/bench_he.py [--tiny]`` or ``zenfed bench he --json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch

from zenfed.privacy.he.ckks import EncryptedSum, Encryptor, UpdateLayout, decrypt_sum, fingerprint
from zenfed.privacy.he.context import make_public_context, make_secret_context
from zenfed.privacy.he.envelope import open_envelope, seal_envelope
from zenfed.privacy.he.params import packing_for, slot_layout
from zenfed.spec import EncryptionSpec

# SmolLM2-135M (LlamaForCausalLM) configuration.
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 576, 1536, 30, 9, 3, 64
SITES = 3


def _module_dims() -> dict[str, tuple[int, int]]:
    kv = KV_HEADS * HEAD_DIM
    return {
        "self_attn.q_proj": (HIDDEN, HEADS * HEAD_DIM),
        "self_attn.k_proj": (HIDDEN, kv),
        "self_attn.v_proj": (HIDDEN, kv),
        "self_attn.o_proj": (HEADS * HEAD_DIM, HIDDEN),
        "mlp.gate_proj": (HIDDEN, INTERMEDIATE),
        "mlp.up_proj": (HIDDEN, INTERMEDIATE),
        "mlp.down_proj": (INTERMEDIATE, HIDDEN),
    }


def lora_shapes(*, rank: int, modules: tuple[str, ...], layers: int) -> dict[str, tuple[int, int]]:
    """PEFT LoRA tensor names and shapes (A: r x in, B: out x r) for SmolLM2-135M."""
    dims = _module_dims()
    shapes = {}
    for i in range(layers):
        for module in modules:
            d_in, d_out = dims[module]
            prefix = f"base_model.model.model.layers.{i}.{module}"
            shapes[f"{prefix}.lora_A.weight"] = (rank, d_in)
            shapes[f"{prefix}.lora_B.weight"] = (d_out, rank)
    return shapes


def _updates(shapes: dict[str, tuple[int, int]], n: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    # One round of LoRA at lr 2e-4 moves weights by about 1e-3; DP noise is of that order too.
    return [{k: torch.randn(s, generator=gen) * 1e-3 for k, s in shapes.items()} for _ in range(n)]


@contextlib.contextmanager
def _stdout_to_stderr():
    # TenSEAL's C++ prints a warning on stdout for every vector larger than one
    # ciphertext (all of the stock path's); keep stdout for the JSON object.
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _stock_bytes(update: dict[str, torch.Tensor]) -> tuple[int, float]:
    import tenseal as ts
    from nvflare.apis.dxo import DXO, DataKind, MetaKey
    from nvflare.apis.fl_context import FLContext
    from nvflare.app_opt.he.constant import HE_ALGORITHM_CKKS
    from nvflare.app_opt.he.model_encryptor import HEModelEncryptor
    from nvflare.lighter.impl.he import HEBuilder

    builder = HEBuilder()  # stock provisioning defaults
    builder.initialize(None, None)
    context = ts.context_from(builder.get_serialized_context(is_client=True))
    encryptor = HEModelEncryptor(weigh_by_local_iter=False)
    encryptor.tenseal_context = context
    encryptor.encrypt_layers = [True]  # what START_RUN sets: encrypt every layer
    params = {k: v.numpy().astype(np.float32) for k, v in update.items()}
    start = time.perf_counter()
    encrypted, processed = encryptor.encryption(params=params, fl_ctx=FLContext())
    dxo = DXO(data_kind=DataKind.WEIGHT_DIFF, data=encrypted)
    dxo.set_meta_prop(MetaKey.PROCESSED_KEYS, processed)
    dxo.set_meta_prop(MetaKey.PROCESSED_ALGORITHM, HE_ALGORITHM_CKKS)
    size = len(dxo.to_shareable().to_bytes())
    return size, time.perf_counter() - start


def _case(name: str, shapes: dict, *, secret, public, packing, workers: int) -> dict:
    updates = _updates(shapes, SITES, seed=len(shapes))
    layout = UpdateLayout.from_update(updates[0])
    n_values = layout.n_values
    weights = [1.0, 0.75, 0.5]
    fp = fingerprint(secret, packing)
    with Encryptor(context=secret, packing=packing) as single:
        cpu = time.process_time()
        single.encrypt(updates[0], weight=1.0, layout=layout)
        cpu_s = time.process_time() - cpu
    with Encryptor(context=secret, packing=packing, workers=workers) as enc:
        enc.encrypt(updates[0], weight=1.0, layout=layout)  # start the worker processes
        start = time.perf_counter()
        blobs = [
            enc.encrypt(u, weight=w, layout=layout)
            for u, w in zip(updates, weights, strict=True)
        ]
        encrypt_s = (time.perf_counter() - start) / SITES
    envelopes = [
        seal_envelope(job="bench", round=1, site=f"site-{i}", fingerprint=fp, n_values=n_values,
                      ciphertext=b)
        for i, b in enumerate(blobs)
    ]
    start = time.perf_counter()
    total = EncryptedSum(context=public)
    for envelope in envelopes:
        _, ciphertext = open_envelope(envelope, job="bench", round=1, fingerprint=fp,
                                      n_values=n_values)
        total.add(ciphertext)
    summed = total.to_bytes()
    aggregate_s = time.perf_counter() - start
    start = time.perf_counter()
    mean = decrypt_sum(summed, context=secret, packing=packing, layout=layout,
                       total_weight=sum(weights))
    decrypt_s = time.perf_counter() - start
    error = max(
        (mean[k].double() - sum(w * u[k].double() for u, w in zip(updates, weights, strict=True))
         / sum(weights))
        .abs().max().item()
        for k in mean
    )
    with _stdout_to_stderr():
        stock_bytes, stock_s = _stock_bytes(updates[0])
    fp32 = 4 * n_values
    return {
        "name": name,
        "values": n_values,
        "tensors": len(shapes),
        "fp32_bytes": fp32,
        "zenfed_bytes": len(envelopes[0]),
        "stock_bytes": stock_bytes,
        "zenfed_ratio_fp32": round(len(envelopes[0]) / fp32, 3),
        "zenfed_sum_bytes": len(summed),
        "zenfed_sum_ratio_fp32": round(len(summed) / fp32, 3),
        "stock_ratio_fp32": round(stock_bytes / fp32, 3),
        "stock_over_zenfed": round(stock_bytes / len(envelopes[0]), 2),
        "encrypt_values_per_s": round(n_values / encrypt_s),
        "encrypt_values_per_cpu_s": round(n_values / cpu_s),
        "stock_encrypt_values_per_s": round(n_values / stock_s),
        "aggregate_s": round(aggregate_s, 3),
        "aggregate_sites": SITES,
        "decrypt_s": round(decrypt_s, 3),
        "max_abs_error": error,
        "quant_step": packing.step,
    }


def _pairwise(shapes: dict, *, secret, public, packing, workers: int) -> dict:
    """The same updates under pairwise masks: bytes, encrypt speed (masks included), exactness of the sum."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from zenfed.privacy.pairwise import PairwiseMasker

    masked = dataclasses.replace(packing, masked=True)
    updates = _updates(shapes, SITES, seed=len(shapes))
    layout = UpdateLayout.from_update(updates[0])
    names = [f"site-{i}" for i in range(SITES)]
    keys = {name: X25519PrivateKey.generate() for name in names}
    maskers = [PairwiseMasker(key=keys[n], site=n, job_id="bench", round_index=1,
                              peers={p: keys[p].public_key() for p in names if p != n}) for n in names]
    weights = [1.0, 0.75, 0.5]
    with Encryptor(context=secret, packing=masked, workers=workers) as enc:
        enc.encrypt(updates[0], weight=1.0, layout=layout, mask=maskers[0].mask)  # start the workers
        start = time.perf_counter()
        blobs = [enc.encrypt(u, weight=w, layout=layout, mask=m.mask)
                 for u, w, m in zip(updates, weights, maskers, strict=True)]
        encrypt_s = (time.perf_counter() - start) / SITES
    fp = fingerprint(secret, masked)
    envelope = seal_envelope(job="bench", round=1, site="site-0", fingerprint=fp, n_values=layout.n_values,
                             ciphertext=blobs[0])
    total = EncryptedSum(context=public)
    for blob in blobs:
        total.add(blob)
    mean = decrypt_sum(total.to_bytes(), context=secret, packing=masked, layout=layout, total_weight=None,
                       contributors=SITES)
    error = max(
        (mean[k].double() - sum(w * u[k].double() for u, w in zip(updates, weights, strict=True)) / sum(weights))
        .abs().max().item() for k in mean
    )
    return {
        "bytes": len(envelope),
        "ratio_fp32": round(len(envelope) / (4 * layout.n_values), 3),
        "encrypt_values_per_s": round(layout.n_values / encrypt_s),
        "max_abs_error": error,
        "mask_bits": slot_layout(secret.params, masked).mask_bits,
    }


def run(*, tiny: bool) -> dict:
    """Run the benchmark; ``tiny`` uses 2 of the 30 layers (for CI). Returns the JSON object."""
    layers = 2 if tiny else LAYERS
    workers = 1 if tiny else min(2, os.cpu_count() or 1)
    packing = packing_for(EncryptionSpec())  # the job defaults, as a real job runs them
    secret = make_secret_context()
    public = make_public_context(secret)
    qkvo = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    cases = [
        ("smollm2_135m_r8_qkvo", lora_shapes(rank=8, modules=qkvo, layers=layers)),
        ("smollm2_135m_r16_all_linear", lora_shapes(rank=16, modules=tuple(_module_dims()),
                                                    layers=layers)),
    ]
    return {
        "benchmark": "he",
        "tiny": tiny,
        "workers": workers,
        "he": {
            "poly_modulus_degree": secret.params.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(secret.params.coeff_mod_bit_sizes),
            "security_bits": secret.security_bits,
            "quant_bits": packing.quant_bits,
            "max_sites": packing.max_sites,
            "clip": packing.clip,
        },
        "cases": [
            {**_case(name, shapes, secret=secret, public=public, packing=packing, workers=workers),
             "pairwise": _pairwise(shapes, secret=secret, public=public, packing=packing, workers=workers)}
            for name, shapes in cases
        ],
        "round_overhead": round_overhead(tiny=tiny),
    }


def round_overhead(*, tiny: bool) -> dict:
    """Round wall time with HE over without: one simulated round (the second, models loaded), side by side."""
    import tempfile
    from pathlib import Path

    from zenfed.data import make_builtin
    from zenfed.engines.base_model import prepare_default_model
    from zenfed.engines.tiny import build_tiny_model
    from zenfed.jobs.simulate import builtin_policies, run_simulation
    from zenfed.spec import JobSpec

    with tempfile.TemporaryDirectory(prefix="zenfed-bench-he-") as tmp:
        root = Path(tmp)
        model = build_tiny_model(root / "tiny") if tiny else prepare_default_model(progress=False)
        make_builtin(root / "data", sites=2, train_per_site=64, valid_per_site=8, test_per_task=2)
        policies = builtin_policies(root / "data", sites=2, dataset="builtin", allow_any_model=True)
        seconds = {}
        encryptions = {"plain": {"enabled": False}, "he": {"enabled": True},
                       "pairwise": {"enabled": True, "secure_aggregation": "pairwise"}}
        for label, encryption in encryptions.items():
            spec = JobSpec.model_validate({
                "name": f"he-overhead-{label}", "model": {"base": str(model)},
                "lora": {"rank": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
                "training": {"local_steps": 4 if tiny else 2, "batch_size": 4, "seq_len": 128},
                "federation": {"rounds": 2, "min_sites": 2}, "evaluation": {"max_examples": 4, "max_new_tokens": 4},
                "encryption": encryption,
            })
            result_dir = run_simulation(spec, workspace=root / label, policies=policies)
            rounds = json.loads((result_dir / "zenfed_result.json").read_text())["rounds"]
            seconds[label] = rounds[-1]["seconds"]
    return {
        "model": "tiny" if tiny else "SmolLM2-135M-Instruct", "sites": 2,
        "round_s_plain": seconds["plain"], "round_s_he": seconds["he"], "round_s_pairwise": seconds["pairwise"],
        "ratio": round(seconds["he"] / seconds["plain"], 3),
        "ratio_pairwise": round(seconds["pairwise"] / seconds["plain"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="2 layers instead of 30")
    print(json.dumps(run(tiny=parser.parse_args().tiny), indent=2))


if __name__ == "__main__":
    main()
