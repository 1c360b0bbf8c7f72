"""Model families: SD 2.x and SDXL through every teacher path and `distill collect`, each family's conditioning as its
own pipeline computes it, variant folders and single-file checkpoints loading the weights of their source, and
`audit init` refusing on the spot what the teachers cannot load."""

import json
import shutil

import numpy as np
import pytest
import torch

from auditor import diffusion, distill, dtrak, families, sql, workspace
from auditor.config import DtrakSettings
from auditor.errors import AuditError
from auditor.teacher import training_set

from . import tiny_families
from .conftest import CHEAP_TEACHER
from .helpers import audit

BUILDERS = {"sd2": tiny_families.build_sd2, "sdxl": tiny_families.build_sdxl}
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: build(root / name) for name, build in BUILDERS.items()}


@pytest.mark.parametrize("family", BUILDERS)
def test_each_family_runs_abu_dtrak_and_collect(family, family_models, indexed_template, tmp_path):
    shutil.copytree(indexed_template.root, tmp_path / "ws", symlinks=True)
    ws = workspace.load(tmp_path / "ws")
    ws.config.paths.model = str(family_models[family])
    ws.config.confirm = ws.config.confirm.override(**CHEAP_TEACHER)
    ws.save()
    # AbU, the collection's teacher, on queries the family's own pipeline generates.
    result = distill.collect(ws, queries=2, candidates=6, sample_steps=2, test_fraction=0.0)
    assert (result.collected, result.planned) == (2, 2)
    influence = np.array(sql.query(ws, "select influence from distill_rankings")["influence"].to_list())
    assert len(influence) == 12 and np.isfinite(influence).all() and np.abs(influence).max() > 0
    # D-TRAK on one of those generations, its kernel over a few training images.
    path, prompt = sql.query(ws, "select path, prompt from distill_queries order by id limit 1").row(0)
    with ws.reader() as store:
        training = training_set(ws, store, ws.model_source(), CPU, "off")
    settings = DtrakSettings(dim=64, timesteps=2)
    teacher = dtrak.DtrakTeacher.for_workspace(ws, training, settings, prepare=False)
    ids = training.ids[:12]
    teacher.fill(ids)
    teacher.kernel, teacher.lam = dtrak.kernel([teacher.table.get(ids)], settings.dim, settings.damping)
    _, scores = teacher.score(diffusion.read_image(path, ws.limits), prompt, ids, 0)
    assert np.isfinite(scores).all() and np.abs(scores).max() > 0


@pytest.mark.parametrize("family", BUILDERS)
def test_the_teachers_condition_and_predict_as_the_familys_pipeline_does(family, family_models):
    model = diffusion.load(family_models[family], CPU)
    pipe = diffusion.pipeline(model)
    prompts = ["a red digit 3", "a blue digit 7"]
    conditioning = model.text_embeddings(prompts)
    noisy = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 700])
    if model.is_xl:
        hidden, _, pooled, _ = pipe.encode_prompt(prompts, device=CPU, do_classifier_free_guidance=False)
        time_ids = pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), torch.float32, pooled.shape[-1])
        extras = {"text_embeds": pooled, "time_ids": time_ids.expand(2, -1)}
        expected = model.unet(noisy, t, encoder_hidden_states=hidden, added_cond_kwargs=extras).sample
        # The pooled embedding and the size ids reach the UNet: without them the output differs.
        other = {"text_embeds": pooled.flip(0), "time_ids": time_ids.expand(2, -1)}
        assert not torch.allclose(
            model.unet(noisy, t, encoder_hidden_states=hidden, added_cond_kwargs=other).sample, expected
        )
    else:
        hidden, _ = pipe.encode_prompt(prompts, CPU, 1, False)
        expected = model.unet(noisy, t, encoder_hidden_states=hidden).sample
        assert model.unet.config.cross_attention_dim == model.text_encoder.config.hidden_size == 48
        assert model.scheduler.config.prediction_type == "v_prediction"
    torch.testing.assert_close(model.predict(noisy, t, conditioning), expected)


def test_sd2_with_epsilon_prediction_trains_on_the_noise(tmp_path):
    model = diffusion.load(tiny_families.build_sd2(tmp_path / "eps", prediction_type="epsilon"), CPU)
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([100, 900])
    conditioning = model.text_embeddings(["a", "b"])
    pred = model.predict(model.scheduler.add_noise(latents, noise, t), t, conditioning)
    loss = model.denoising_loss(latents, conditioning, t, noise)
    torch.testing.assert_close(loss, ((pred - noise) ** 2).mean(dim=(1, 2, 3)))


def _state(model) -> dict[str, torch.Tensor]:
    return {
        f"{part}.{k}": v
        for part in ("unet", "vae", "text_encoder")
        for k, v in getattr(model, part).state_dict().items()
    }


def test_a_variant_only_folder_loads_its_weights_upcast_and_is_detected(tiny_pipeline, tmp_path):
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.from_pretrained(tiny_pipeline, dtype=torch.float16).save_pretrained(
        tmp_path / "fp16", variant="fp16"
    )
    assert not list((tmp_path / "fp16" / "unet").glob("diffusion_pytorch_model.safetensors"))
    source = families.resolve(tmp_path / "fp16")
    assert source.variant == "fp16"
    loaded = diffusion.load(source, CPU)
    reference = _state(diffusion.load(tiny_pipeline, CPU))
    for name, value in _state(loaded).items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, reference[name].half().float(), rtol=0, atol=0)
    with pytest.raises(AuditError, match="no 'bf16' variant"):
        families.resolve(tmp_path / "fp16", variant="bf16")


def test_a_single_file_checkpoint_loads_the_weights_of_its_source_folder(tiny_pipeline, tmp_path):
    checkpoint = tiny_families.single_file(tiny_pipeline, tmp_path / "model.safetensors")
    with pytest.raises(AuditError, match="model_config") as refused:
        families.resolve(checkpoint)
    assert "\n" not in str(refused.value)
    loaded = diffusion.load(families.resolve(checkpoint, tiny_pipeline), CPU)
    reference = _state(diffusion.load(tiny_pipeline, CPU))
    state = _state(loaded)
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in state)
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    # init records it with its config; the teachers load it from there.
    ws = workspace.init(tmp_path / "ws", model=checkpoint, model_config=tiny_pipeline)
    assert ws.model_source().single_file and ws.model_source().config == tiny_pipeline.resolve()


def test_init_refuses_unsupported_families_and_bad_paths_in_one_line(tmp_path, tiny_encoder, family_models):
    sd3 = tmp_path / "sd3"
    sd3.mkdir()
    (sd3 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    cases = {
        "StableDiffusion3Pipeline": dict(model=sd3),
        "does not exist": dict(model=tmp_path / "nowhere"),
        "no model_index.json": dict(model=tmp_path),
        "encoder bundle": dict(encoder=tmp_path / "no-bundle"),
    }
    for expected, given in cases.items():
        with pytest.raises(AuditError, match=expected) as refused:
            workspace.init(tmp_path / "ws", **given)
        assert "\n" not in str(refused.value)
        assert not (tmp_path / "ws" / ".audit").exists()
    proc = audit("init", tmp_path / "ws", "--model", sd3, check=False)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert "supported: Stable Diffusion 1.x/2.x (StableDiffusionPipeline) and SDXL" in proc.stderr
    proc = audit("init", tmp_path / "ws", "--model", family_models["sdxl"], "--encoder", tiny_encoder)
    assert "SDXL (diffusers folder)" in proc.stdout
