"""C2PA manifests (issue #26): the generator and digital source type they declare, read through the optional
c2pa-python library from images signed here with a throwaway certificate chain; and what happens without it."""

from __future__ import annotations

import datetime
import io
import json
import logging

import pytest
from PIL import Image

from auditor import sql
from auditor.ingest import Limits, decode
from auditor.prompts import GenerationMetadata, read_metadata
from auditor.prompts import c2pa as c2pa_reader
from auditor.scan import scan
from auditor.store import Store

from . import metadata_fixtures as fx
from .helpers import store_made_before

GENERATED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
COMPOSITE = "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"


def meta(data: bytes) -> GenerationMetadata:
    _, info = decode(data, Limits())
    return read_metadata(None, info)


def c2pa_warnings(md: GenerationMetadata) -> list[str]:
    return [w for w in md.warnings if "C2PA" in w]


def action(source_type=GENERATED, agent=None, **extra) -> dict:
    entry = {"action": "c2pa.created", "digitalSourceType": source_type, **extra}
    if agent is not None:
        entry["softwareAgent"] = agent
    return entry


def manifest(actions: list[dict], **claim) -> dict:
    return {"assertions": [{"label": "c2pa.actions.v2", "data": {"actions": actions}}], **claim}


def store_of(active: dict, **others) -> dict:
    return {"active_manifest": "urn:a", "manifests": {"urn:a": active, **others}, "validation_state": "Valid"}


# --- the manifest store as the library reports it: no library needed ------------------------------------------------


def test_generator_is_the_claim_generator_with_a_differing_software_agent():
    chatgpt = manifest([action(agent={"name": "GPT-4o"})], claim_generator_info=[{"name": "ChatGPT"}])
    assert c2pa_reader.summarize(store_of(chatgpt)).generator == "ChatGPT (GPT-4o)"
    firefly = manifest([action(agent="Adobe Firefly")], claim_generator_info=[{"name": "Adobe Firefly", "version": 3}])
    facts = c2pa_reader.summarize(store_of(firefly))
    assert (facts.generator, facts.digital_source_type, facts.warnings) == ("Adobe Firefly", GENERATED, [])
    # C2PA 1.x: a user-agent string; actions v2 may point at the generator list instead of naming the agent
    old = manifest([action(softwareAgentIndex=1)], claim_generator="Adobe_Firefly/1.0 c2pa-rs/0.25.2")
    old["claim_generator_info"] = [{"name": "Adobe_Firefly"}, {"name": "Firefly Image 3"}]
    assert c2pa_reader.summarize(store_of(old)).generator == "Adobe_Firefly (Firefly Image 3)"
    old.pop("claim_generator_info")
    assert c2pa_reader.summarize(store_of(old)).generator == "Adobe_Firefly"


def test_source_type_comes_from_the_ingredients_when_the_active_manifest_states_none():
    """Generated in one app, edited in another: the edit's manifest has no source type, the one it was made from has."""
    edit = manifest([{"action": "c2pa.color_adjustments"}], claim_generator_info=[{"name": "Photo Editor"}])
    edit["ingredients"] = [{"active_manifest": "urn:missing"}, {"active_manifest": "urn:b"}, "junk"]
    made = manifest([{"action": "c2pa.opened"}, action(agent="Imagen")], ingredients=[{"active_manifest": "urn:a"}])
    facts = c2pa_reader.summarize(store_of(edit, **{"urn:b": made}))  # urn:b names urn:a back: no endless loop
    assert (facts.generator, facts.digital_source_type) == ("Photo Editor (Imagen)", GENERATED)
    composite = manifest([action(COMPOSITE, agent="Photo Editor")], claim_generator_info=[{"name": "Photo Editor"}])
    assert c2pa_reader.summarize(store_of(composite)).digital_source_type == COMPOSITE


@pytest.mark.parametrize(
    "store",
    [
        [],
        {"manifests": []},
        {"active_manifest": 3, "manifests": {"3": {}}},
        store_of({"assertions": "x"}),
        store_of({"assertions": [None, {"label": 5}, {"label": "c2pa.actions", "data": {"actions": [1, {}]}}]}),
        store_of({"claim_generator_info": "x", "claim_generator": ["y"], "ingredients": {"a": 1}}),
        store_of(manifest([action(source_type=["x"], agent=["y"], softwareAgentIndex=99)])),
    ],
)
def test_any_shape_of_store_is_read_without_raising(store):
    facts = c2pa_reader.summarize(store)
    assert facts.digital_source_type is None and facts.found


def test_an_invalid_manifest_is_read_with_a_warning():
    store = store_of(manifest([action()], claim_generator_info=[{"name": "Gen"}]))
    store["validation_state"] = "Invalid"
    failures = [{"code": "signingCredential.untrusted"}, {"code": "assertion.dataHash.mismatch"}, 7]
    store["validation_results"] = {"activeManifest": {"failure": failures}}
    facts = c2pa_reader.summarize(store)
    assert (facts.generator, facts.warnings) == (
        "Gen",
        ["C2PA manifest failed validation: assertion.dataHash.mismatch"],
    )


# --- without the library --------------------------------------------------------------------------------------------


def jpeg_with_app11(payload: bytes) -> bytes:
    """A JPEG with an APP11 segment as C2PA embeds its JUMBF manifest store (here a stand-in, not a real store)."""
    out = io.BytesIO()
    Image.new("RGB", fx.SIZE, (10, 120, 200)).save(out, "JPEG")
    data = out.getvalue()
    segment = b"JP\x00\x01\x00\x00\x00\x01" + payload
    return data[:2] + b"\xff\xeb" + (len(segment) + 2).to_bytes(2, "big") + segment + data[2:]


@pytest.fixture
def without_library(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "c2pa", None)  # `import c2pa` raises ImportError, as when not installed
    monkeypatch.setattr(c2pa_reader, "_state", {})


def test_without_the_library_a_manifest_gets_one_warning_and_one_log_line(without_library, caplog):
    data = jpeg_with_app11(b"\x00\x00\x00\x20jumb\x00\x00\x00\x18jumdc2pa")
    with caplog.at_level(logging.WARNING, logger="auditor.prompts.c2pa"):
        first, second = meta(data), meta(data)
        plain = meta(fx.png({"parameters": "a fox\nSteps: 20, Seed: 1"}))
    hint = "C2PA manifest present but not read: install provenance-auditor[c2pa] to read C2PA manifests"
    assert first.warnings == second.warnings == [hint]
    assert (first.source, first.generator, first.digital_source_type, first.raw) == ("none", None, None, None)
    assert (plain.prompt, plain.warnings, plain.digital_source_type) == ("a fox", [], None)
    logged = [r.getMessage() for r in caplog.records if "C2PA" in r.getMessage()]
    assert logged == ["images hold C2PA manifests that are not read: " + c2pa_reader.INSTALL_HINT]


def test_without_the_library_images_without_a_manifest_say_nothing(without_library, caplog):
    with caplog.at_level(logging.WARNING, logger="auditor.prompts.c2pa"):
        md = meta(jpeg_with_app11(b"just an APP11 segment"))
    assert md.warnings == [] and not caplog.records


# --- signed here, read through the library --------------------------------------------------------------------------


def certificate_chain() -> tuple[bytes, bytes]:
    """(PEM chain: end-entity then CA, PEM PKCS#8 key) for ES256. C2PA wants a CA-issued signing certificate (not
    self-signed) with digitalSignature key usage and an EKU such as emailProtection."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(common: str):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Audit tests")])  # fmt: skip

    def usage(**on):
        flags = ["digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
                 "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"]  # fmt: skip
        return x509.KeyUsage(**{flag: on.get(flag, False) for flag in flags})

    def certificate(subject, issuer, public, signing_key, ca: bool):
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        )
        if ca:
            builder = builder.add_extension(usage(key_cert_sign=True, crl_sign=True), critical=True)
        else:
            builder = (
                builder.add_extension(usage(digital_signature=True), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
                .add_extension(
                    x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()), critical=False
                )
            )
        return builder.sign(signing_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = certificate(name("Audit test CA"), name("Audit test CA"), ca_key.public_key(), ca_key, ca=True)
    signer = certificate(name("Audit test signer"), ca.subject, key.public_key(), ca_key, ca=False)
    pem = serialization.Encoding.PEM
    chain = signer.public_bytes(pem) + ca.public_bytes(pem)
    return chain, key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@pytest.fixture(scope="module")
def sign():
    """sign(image bytes, MIME type, manifest definition) -> the image with the manifest embedded."""
    c2pa = pytest.importorskip("c2pa")
    chain, key = certificate_chain()

    def signed(data: bytes, mime: str, definition: dict) -> bytes:
        signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(b"es256", chain, key, None))
        out = io.BytesIO()
        with signer, c2pa.Builder(definition) as builder:
            builder.sign(signer, mime, io.BytesIO(data), out)
        return out.getvalue()

    return signed


FIREFLY = {
    "claim_generator_info": [{"name": "Adobe Firefly", "version": "3.0"}],
    "title": "generated.jpg",
    "assertions": [
        {
            "label": "c2pa.actions",
            "data": {"actions": [action(agent={"name": "Adobe Firefly", "version": "3"}, description="Generated")]},
        }
    ],
}
CHATGPT = {**FIREFLY, "claim_generator_info": [{"name": "ChatGPT"}]}
CHATGPT["assertions"] = [{"label": "c2pa.actions", "data": {"actions": [action(agent={"name": "GPT-4o"})]}}]


def jpeg(color=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", fx.SIZE, color).save(out, "JPEG")
    return out.getvalue()


def test_a_signed_jpeg_gives_its_generator_and_source_type(sign):
    md = meta(sign(jpeg(), "image/jpeg", FIREFLY))
    assert (md.source, md.prompt, md.generator, md.digital_source_type) == ("c2pa", None, "Adobe Firefly", GENERATED)
    assert md.warnings == [] and not md.has_fields()
    store = json.loads(md.raw)  # the manifest store as the library reports it, kept for audit
    assert store["manifests"][store["active_manifest"]]["claim_generator_info"][0]["name"] == "Adobe Firefly"
    chatgpt = meta(sign(jpeg(), "image/jpeg", CHATGPT))
    assert (chatgpt.generator, chatgpt.digital_source_type) == ("ChatGPT (GPT-4o)", GENERATED)


def test_c2pa_complements_the_other_metadata_and_never_overrides_it(sign):
    a1111 = "a red fox\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, Seed: 7, Model hash: abcdef1234"
    md = meta(sign(fx.png({"parameters": a1111}), "image/png", FIREFLY))
    assert (md.source, md.prompt, md.generator, md.model_hash) == ("a1111", "a red fox", "AUTOMATIC1111", "abcdef1234")
    assert (md.digital_source_type, md.raw, md.warnings) == (GENERATED, a1111, [])


def test_a_tampered_or_broken_manifest_never_fails_the_image(sign):
    signed = sign(jpeg(), "image/jpeg", FIREFLY)
    tampered = meta(signed + b"appended after the signature")  # the data hash no longer matches
    assert (tampered.generator, tampered.digital_source_type) == ("Adobe Firefly", GENERATED)
    assert tampered.warnings == ["C2PA manifest failed validation: assertion.dataHash.mismatch"]
    at = signed.index(b"c2pa.claim")
    broken = meta(signed[:at] + b"\xff" * 64 + signed[at + 64 :])  # the JUMBF boxes themselves garbled
    assert broken.prompt is None and broken.digital_source_type is None
    assert [w.split(":")[0] for w in broken.warnings] == ["C2PA manifest unreadable"]


def test_scan_stores_generator_and_digital_source_type(sign, indexed_ws, tmp_path):
    out = tmp_path / "outputs"
    out.mkdir()
    (out / "firefly.jpg").write_bytes(sign(jpeg(), "image/jpeg", FIREFLY))
    (out / "plain.png").write_bytes(fx.png({"parameters": "a grey fox\nSteps: 20, Seed: 1"}))
    scan(indexed_ws, out, top_k=3)
    rows = sql.query(
        indexed_ws,
        "SELECT regexp_extract(path, '[^/]+$') AS name, prompt, prompt_source, metadata_source, generator,"
        " digital_source_type, metadata_warnings, metadata_raw IS NOT NULL AS has_raw FROM generations ORDER BY 1",
    ).rows()
    assert rows == [
        ("firefly.jpg", None, "none", "c2pa", "Adobe Firefly", GENERATED, [], True),
        ("plain.png", "a grey fox", "a1111", "a1111", "AUTOMATIC1111", None, [], True),
    ]


def test_migration_008_applies_to_a_store_made_before_it(tmp_path):
    path = tmp_path / "audit.duckdb"
    store_made_before(path, 8).close()
    with Store(path) as store:
        assert 8 in {row[0] for row in store.rows("SELECT version FROM schema_migrations")}
        assert store.rows("SELECT prompt, digital_source_type FROM generations") == [("a fox", None)]
