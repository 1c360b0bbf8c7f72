"""D-TRAK: block-wise per-sample gradient features against plain autograd, the projection, and `confirm --method dtrak`."""

import json

import numpy as np
import pytest
import torch

from auditor import confirm, diffusion, dtrak, sql
from auditor.config import DtrakSettings
from auditor.errors import AuditError

from .helpers import audit, sql_value
from .tiny_sd import random_batch as _batch


def _brute_force(model, params, latent, text_emb, noise, timesteps, views):
    """∇θ of f(x) = mean over views and timesteps of ‖model output‖², for one sample, by plain autograd."""
    for p in params.values():
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            rows = torch.cat(
                [model.scheduler.add_noise(v.expand(len(noise), -1, -1, -1), noise, timesteps) for v in views(latent)]
            )
            out = model.unet(
                rows, timesteps.repeat(len(views(latent))), encoder_hidden_states=text_emb.expand(len(rows), -1, -1)
            ).sample
            f = out.pow(2).flatten(1).sum(1).mean()
            grads = torch.autograd.grad(f, list(params.values()))
    finally:
        for p in params.values():
            p.requires_grad_(False)
    return {name: g[None] for name, g in zip(params, grads)}


@pytest.mark.parametrize("which, flip", [("kv", False), ("kv", True), ("all", False)])
def test_blockwise_features_equal_brute_force_per_sample_gradients(model, which, flip):
    latents, text = _batch(model, n=3)
    ids = np.array([7, 8, 9])
    settings = DtrakSettings(timesteps=3, params=which, dim=512, batch_size=2, seed=5)
    features = dtrak.GradientFeatures(model, settings)
    got = features(latents, text, ids, seed=11, flipped=latents.flip(-1) if flip else None)
    timesteps = diffusion.evenly_spaced_timesteps(3, model.num_train_timesteps)
    noise = diffusion.fixed_noise(ids, 3, (4, 8, 8), seed=11)
    views = (lambda x: [x, x.flip(-1)]) if flip else (lambda x: [x])
    params = diffusion.parameter_set(model.unet, which, "test")
    for i in range(3):
        expected = features.projection(_brute_force(model, params, latents[i], text[i], noise[i], timesteps, views))[
            0
        ].numpy()
        np.testing.assert_allclose(got[i], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # The model is as it was: no gradients switched on, the attention processors restored.
    assert not any(p.requires_grad for p in model.unet.parameters())
    assert {type(p).__name__ for p in model.unet.attn_processors.values()} == {"AttnProcessor2_0"}


def test_projection_preserves_inner_products(model):
    latents, text = _batch(model, n=4, seed=1)
    timesteps = diffusion.evenly_spaced_timesteps(2, model.num_train_timesteps)
    noise = diffusion.fixed_noise(range(4), 2, (4, 8, 8), seed=0)
    params = diffusion.parameter_set(model.unet, "all", "test")
    grads = [_brute_force(model, params, latents[i], text[i], noise[i], timesteps, lambda x: [x]) for i in range(4)]
    flat = np.stack([torch.cat([g[n].flatten() for n in params]).numpy() for g in grads]).astype(np.float64)
    projection = dtrak.Projection({n: p.shape for n, p in params.items()}, 8192, seed=3, device=torch.device("cpu"))
    projected = np.stack([projection(g)[0].numpy() for g in grads]).astype(np.float64)
    true, approx = flat @ flat.T, projected @ projected.T
    norms = np.sqrt(np.outer(np.diag(true), np.diag(true)))
    # CountSketch: unbiased, error ~ ‖a‖‖b‖/√k ≈ 0.011 here.
    assert np.abs(approx - true).max() / norms.max() < 0.06
    assert np.abs(approx / norms - true / norms).max() < 0.06
    # Deterministic in its seed, different across seeds.
    again = dtrak.Projection({n: p.shape for n, p in params.items()}, 8192, seed=3, device=torch.device("cpu"))
    assert torch.equal(again(grads[0]), projection(grads[0]))
    other = dtrak.Projection({n: p.shape for n, p in params.items()}, 8192, seed=4, device=torch.device("cpu"))
    assert not torch.equal(other(grads[0]), projection(grads[0]))


def test_kernel_is_the_damped_inverse_gram():
    rng = np.random.default_rng(0)
    phi = rng.standard_normal((50, 8)).astype(np.float32)
    k, lam = dtrak.kernel([phi[:20], phi[20:]], 8, damping=0.1)
    gram = phi.astype(np.float64).T @ phi
    assert lam == pytest.approx(0.1 * np.trace(gram) / 8)
    np.testing.assert_allclose(k @ (gram + lam * np.eye(8)), np.eye(8), atol=1e-4)


def test_confirm_dtrak_stores_rows_agreement_and_reuses_features(scanned_ws):
    ws = scanned_ws
    ws.config.dtrak = ws.config.dtrak.override(dim=256, timesteps=2, batch_size=32)
    ws.save()
    result = confirm.confirm(ws, method="dtrak", top=2)
    assert (result.generations, len(result.failed)) == (2, 0)
    assert result.noise_floor > 0 and result.signal_to_noise > 0
    run = sql.query(ws, "select * from confirm_runs").row(0, named=True)
    assert run["method"] == "dtrak" and run["status"] == "finished" and run["noise_floor"] > 0
    assert '"lambda"' in run["settings"] and '"candidates": 20' in run["settings"]
    n_candidates = 20 + 8
    assert sql_value(ws, "select count(*) from teacher_scores where raw_influence = influence") == 2 * n_candidates
    conf = sql.query(ws, "select * from confirmations")
    assert conf.height == 2 and set(conf["method"]) == {"dtrak"} and conf["map_at_k"].is_between(0, 1).all()
    features = dtrak.FeatureTable(ws.lancedb_uri, json.loads(run["settings"])["feature_table"], 256)
    assert (
        sorted(features.ids().tolist()) == sql.query(ws, "select id from training_images order by id")["id"].to_list()
    )
    version = features.version
    kernels = list((ws.dir / "cache").glob("dtrak-kernel-*.npz"))
    assert len(kernels) == 1

    # The CLI, a second run: the features and the kernel are reused, not recomputed.
    mtime = kernels[0].stat().st_mtime_ns
    proc = audit("confirm", "--method", "dtrak", "--top", 2, ws=ws)
    assert "confirm run 2" in proc.stdout and "D-TRAK: computing" not in proc.stderr
    assert dtrak.FeatureTable(ws.lancedb_uri, features.name, 256).version == version
    assert [p.stat().st_mtime_ns for p in (ws.dir / "cache").glob("dtrak-kernel-*.npz")] == [mtime]

    gen = int(conf["generation_id"][0])
    # Its batch size is memory only: a run in smaller batches is the same run, with nothing left to confirm.
    ws.config.dtrak = ws.config.dtrak.override(batch_size=8)
    assert confirm.confirm(ws, method="dtrak", generation=gen).run_id is None

    # AbU on one of the same generations: the same candidates, so the teachers compare in one query.
    confirm.confirm(ws, method="abu", generation=gen)
    both = sql.query(
        ws,
        f"""
        select a.training_id, a.fast_rank, a.teacher_rank as abu_rank, d.teacher_rank as dtrak_rank
        from teacher_scores a join confirm_runs ra on ra.id = a.run_id and ra.method = 'abu'
        join teacher_scores d on d.generation_id = a.generation_id and d.training_id = a.training_id
        join confirm_runs rd on rd.id = d.run_id and rd.method = 'dtrak'
        where a.generation_id = {gen}""",
    )
    assert both.height == n_candidates


def test_unknown_method_is_a_one_line_error(scanned_ws):
    with pytest.raises(AuditError, match="use abu, dtrak"):
        confirm.confirm(scanned_ws, method="trak", top=1)
