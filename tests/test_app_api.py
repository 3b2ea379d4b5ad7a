"""The app's API through gradio_client against a launched app on 127.0.0.1 (offline presets,
the real SmolLM2-135M-Instruct): load a pool, move τ, generate side by side, export, and see
that bad inputs come back as errors while the server keeps serving.
"""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402

pytestmark = pytest.mark.slow

N = None  # MAX_VECTORS, set by the fixture


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    from devec_core import studio
    from tests.conftest import launched_app

    global N
    N = studio.MAX_VECTORS
    with launched_app(tmp_path_factory.mktemp("devec_cache")) as url:  # fresh cache: converts SmolLM2's GGUF
        yield url


@pytest.fixture(scope="module")
def client(app_url):
    from gradio_client import Client

    return Client(app_url, verbose=False)


def _coefs(vanilla, unique, shared=0.0):
    """The coefficient sliders as the API's named parameters (vans_0 … , unis_0 … , links_i, shared)."""
    kw = {f"vans_{i}": float(v) for i, v in enumerate(vanilla)}
    kw.update({f"unis_{i}": float(u) for i, u in enumerate(unique)})
    kw.update({f"links_{i}": False for i in range(len(vanilla))})  # DeVec's λ set on its own
    return {**kw, "shared": float(shared)}


def _value(x):
    return x.get("value") if isinstance(x, dict) else x


def test_llm_offline_preset_end_to_end(client, tmp_path):
    from devec_core import studio

    preset = studio.get_preset(studio.default_preset("llm"))
    # a new visitor already has the default preset (opened at server start): picking it again
    # changes nothing (no reload that would wipe τ and the sliders)
    out = client.predict(preset.id, api_name="/llm_preset")
    assert all(_value(x) is None for x in out[:8]), out[:8]
    names = preset.names

    # τ re-threshold: the report follows
    new_tau, rep = client.predict(0.3, api_name="/llm_tau")[:2]
    assert new_tau == 0.3 and "τ = 0.30" in rep  # τ goes back into the slider with the report

    # side by side on the real SmolLM2 at the preset's opening coefficients (toxicity removal:
    # vanilla drops the whole toxic vector, DeVec only its unique part), each output scored
    c = preset.coefficients
    van, dv, t_van, t_dv, note = client.predict(
        tau=0.85, **_coefs([c.vanilla.get(n, 0.0) for n in names], [c.unique.get(n, 0.0) for n in names], c.shared),
        prompt=preset.prompts[0], seed=0, max_new_tokens=16, temperature=0.0, api_name="/llm_generate",
    )[:5]
    assert van.strip() and dv.strip() and van != dv
    assert "DeVec" in t_dv and "τ 0.85" in note and "seed 0" in note  # each output says what made it
    assert "toxicity" in t_van and "offensive words" in t_dv
    assert "no title line" in t_van and "title line ✓" in t_dv  # vanilla loses S, DeVec keeps it

    # export: a zip of PEFT adapter folders
    files = client.predict(0.85, api_name="/llm_export")
    assert files and str(files[0]).endswith(".zip")


def test_llm_wrong_base_and_bad_upload_are_errors(client, tmp_path):
    """A LoRA made for another model (the tiny test Llama) decomposes, but generating with it on
    SmolLM2 is refused with what to do; a non-safetensors upload is refused before reading."""
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError
    from safetensors.torch import save_file

    from tests.tiny_models import random_llama_lora, tiny_llama

    import shutil

    from peft import LoraConfig

    model, _ = tiny_llama()
    for seed in (1, 2):  # zipped PEFT folders (adapter_model.safetensors + adapter_config.json)
        d = tmp_path / f"other{seed}"
        d.mkdir()
        save_file({k: v.contiguous() for k, v in random_llama_lora(model, rank=2, seed=seed).items()}, str(d / "adapter_model.safetensors"))
        LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]).save_pretrained(str(d))
        shutil.make_archive(str(d), "zip", root_dir=d)
    ups = [handle_file(str(tmp_path / f"other{s}.zip")) for s in (1, 2)]
    client.predict(files=ups, hub="", base="smollm2", add_to=False, mode="joint", tau=0.85, api_name="/llm_custom")
    with pytest.raises(AppError, match="another base model"):
        client.predict(tau=0.85, **_coefs([1.0, 1.0], [1.0, 1.0]), prompt="hello", seed=0, max_new_tokens=4, api_name="/llm_generate")
    bad = tmp_path / "adapter.bin"
    bad.write_bytes(b"\x80\x04 not a LoRA")
    with pytest.raises(AppError, match="safetensors|file type|Invalid"):
        client.predict(files=[handle_file(str(bad))], hub="", base="smollm2", add_to=False, mode="joint", tau=0.85, api_name="/llm_custom")


def test_bad_inputs_are_errors_and_the_server_survives(client):
    from gradio_client.exceptions import AppError

    from devec_core import studio

    client.predict("flux-synthetic-offline", api_name="/flux_preset")
    with pytest.raises(AppError, match="minimum|τ"):  # τ = 0: refused (by the slider's bounds)
        client.predict(0.0, api_name="/flux_tau")
    with pytest.raises(AppError, match="SYNTHETIC"):
        client.predict(tau=0.85, **_coefs([1.0] * 5, [1.0] * 5), prompt="a fox", seed=0, steps=2, width=256, height=256,
                       api_name="/flux_generate")
    with pytest.raises(AppError, match="not in the list of choices|Unknown preset"):
        client.predict("no-such-preset", api_name="/flux_preset")
    with pytest.raises(AppError, match="empty"):
        client.predict(files=[], hub="", base="smollm2", add_to=False, mode="joint", tau=0.85, api_name="/llm_custom")
    # still serving, state intact
    assert "τ = 0.90" in client.predict(0.9, api_name="/flux_tau")[1]


def test_sessions_do_not_share_state(app_url):
    from gradio_client import Client

    from devec_core import studio

    a, b = Client(app_url, verbose=False), Client(app_url, verbose=False)
    fid = studio.default_preset("flux")
    a.predict(fid, api_name="/flux_preset")
    b.predict(fid, api_name="/flux_preset")
    ra = a.predict(0.5, api_name="/flux_tau")[1]
    rb = b.predict(0.99, api_name="/flux_tau")[1]
    assert "τ = 0.50" in ra and "τ = 0.99" in rb
    c = Client(app_url, verbose=False)  # a new visitor opens the default preset, at its τ, not a's or b's
    out = c.predict(fid, api_name="/flux_preset")  # the preset that is already open: nothing to change
    assert all(_value(x) is None for x in out[:3]), out[:3]
    assert "τ = 0.85" in c.predict(0.85, api_name="/flux_tau")[1]
    assert "τ = 0.50" in a.predict(0.5, api_name="/flux_tau")[1]
