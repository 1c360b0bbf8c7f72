"""C2PA manifests (Content Credentials), which commercial generators embed: the generator and the digital source type.

Read through the optional `c2pa-python` library (`pip install 'provenance-auditor[c2pa]'`). Without it, an image
that holds a manifest gets one warning saying so, and the log says it once per process. The manifest complements
the other readers, it never replaces what they found: it names the generator only when they did not, and adds the
digital source type (IPTC's `trainedAlgorithmicMedia`, `compositeWithTrainedAlgorithmicMedia`, ...) that only C2PA
declares. It carries no prompt (an action's `description` is free text about the edit, not what the model was
asked), so an image with only a manifest is attributed from its pixels alone.

The manifest is as untrusted as any metadata: `read` never raises, and the library never fetches a remote
manifest or OCSP response (a scan makes no network requests). Its signature is validated but not trusted: the
store records what the manifest declares, with a warning when the library finds it invalid (tampered).
"""

from __future__ import annotations

import io
import json
import logging
import threading
from dataclasses import dataclass, field

from .base import as_str

log = logging.getLogger(__name__)

# The info entry (`ingest.decode`) holding the file's bytes when they look like they hold a C2PA manifest.
C2PA_KEY = "c2pa_manifest_bytes"
INSTALL_HINT = "install provenance-auditor[c2pa] to read C2PA manifests"
# The library's settings: read what is in the file, fetch nothing.
_SETTINGS = {"verify": {"remote_manifest_fetch": False, "ocsp_fetch": False}}
_MAX_FAILURES = 5
# Every signer is "untrusted" without a trust list, which this reader does not configure: not worth a warning.
_UNTRUSTED = "signingCredential.untrusted"

_lock = threading.Lock()
_state: dict = {}  # "lib": the module or None, "error": why it is missing, "context", "hinted"


def present(data: bytes) -> bool:
    """Whether the bytes may hold an embedded C2PA manifest store: a JUMBF box labelled `c2pa` (JPEG APP11, PNG
    caBX, WebP/RIFF C2PA, ISO BMFF uuid). A cheap test; the library decides."""
    return b"jumb" in data and b"c2pa" in data


@dataclass
class Facts:
    generator: str | None = None
    digital_source_type: str | None = None
    raw: str | None = None  # the manifest store as the library reports it (JSON)
    found: bool = False  # a manifest was read
    warnings: list[str] = field(default_factory=list)


def _library():
    """(module, context), or (None, why) when c2pa-python is not installed or does not load."""
    with _lock:
        if "lib" not in _state:
            try:
                import c2pa as lib  # absolute: the c2pa-python package, not this module

                _state["context"] = lib.Context.from_dict(_SETTINGS)
                _state["lib"] = lib
            except ImportError:
                _state["lib"], _state["error"] = None, INSTALL_HINT
            except Exception as exc:  # a broken native library: the scan goes on without C2PA
                _state["lib"], _state["error"] = None, f"C2PA library unusable ({type(exc).__name__}: {exc})"
            if _state["lib"] is None:
                log.warning("images hold C2PA manifests that are not read: %s", _state["error"])
        if _state["lib"] is None:
            return None, _state["error"]
        return _state["lib"], _state["context"]


def _mime(data: bytes) -> str | None:
    """The container's MIME type from its magic bytes (the library auto-detects when None)."""
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "image/tiff"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[4:8] == b"ftyp":
        return "image/avif" if data[8:12] in (b"avif", b"avis") else "image/heif"
    return None


def read(data: bytes) -> Facts:
    """What the embedded manifest store declares; never raises (a failure is a warning)."""
    lib, context_or_why = _library()
    if lib is None:
        return Facts(warnings=[f"C2PA manifest present but not read: {context_or_why}"])
    context = context_or_why
    try:
        reader = lib.Reader.try_create(_mime(data), io.BytesIO(data), None, context)
        if reader is None:
            return Facts()
        with reader:
            text = reader.json()
        facts = summarize(json.loads(text))
        facts.raw = text
        return facts
    except Exception as exc:  # the library's errors on a corrupt manifest, or a bug: the image goes on
        why = str(exc) if isinstance(exc, lib.C2paError) else f"{type(exc).__name__}: {exc}"
        return Facts(warnings=[f"C2PA manifest unreadable: {why}"])


def summarize(store) -> Facts:
    """Generator and digital source type of a manifest store (`Reader.json()` parsed), each field type-checked."""
    facts = Facts(found=True)
    if not isinstance(store, dict):
        facts.warnings.append("C2PA manifest store is not a JSON object")
        return facts
    manifests = store.get("manifests") if isinstance(store.get("manifests"), dict) else {}
    active = manifests.get(store.get("active_manifest")) if isinstance(store.get("active_manifest"), str) else None
    if not isinstance(active, dict):
        facts.warnings.append("C2PA manifest store has no active manifest")
        return facts
    claim = _claim_generator(active)
    source_type, agent = None, None
    for manifest in _chain(active, manifests):  # the active manifest first, then what it was made from
        source_type, agent = _source_type(manifest)
        if source_type:
            break
    if claim and agent and agent.casefold() not in claim.casefold():
        facts.generator = f"{claim} ({agent})"  # e.g. "ChatGPT (GPT-4o)": the app, then what made the pixels
    else:
        facts.generator = claim or agent
    facts.digital_source_type = source_type
    if store.get("validation_state") == "Invalid":
        facts.warnings.append("C2PA manifest failed validation" + _failures(store.get("validation_results")))
    return facts


def _claim_generator(manifest: dict) -> str | None:
    infos = manifest.get("claim_generator_info")
    for info in infos if isinstance(infos, list) else [infos]:
        name = _agent(info)
        if name:
            return name
    # C2PA 1.x: a user-agent string, "Adobe_Firefly/1.0 c2pa-rs/0.25.2": its first product, without the version
    text = as_str(manifest.get("claim_generator"))
    return (text.split()[0].split("/")[0] or None) if text else None


def _agent(value) -> str | None:
    """A softwareAgent or claim_generator_info entry: a string, or {name, version}."""
    if isinstance(value, dict):
        return as_str(value.get("name"))
    return as_str(value)


def _chain(active: dict, manifests: dict):
    """The active manifest, then its ingredients' manifests breadth first (each once: a loop cannot hang)."""
    queue, seen = [active], {id(active)}
    while queue:
        manifest = queue.pop(0)
        yield manifest
        ingredients = manifest.get("ingredients")
        for ingredient in ingredients if isinstance(ingredients, list) else []:
            label = ingredient.get("active_manifest") if isinstance(ingredient, dict) else None
            parent = manifests.get(label) if isinstance(label, str) else None
            if isinstance(parent, dict) and id(parent) not in seen:
                seen.add(id(parent))
                queue.append(parent)


def _source_type(manifest: dict) -> tuple[str | None, str | None]:
    """(digitalSourceType, softwareAgent) of the first action in the manifest's `c2pa.actions` that declares one."""
    assertions = manifest.get("assertions")
    for assertion in assertions if isinstance(assertions, list) else []:
        if not isinstance(assertion, dict) or not str(assertion.get("label", "")).startswith("c2pa.actions"):
            continue
        data = assertion.get("data")
        actions = data.get("actions") if isinstance(data, dict) else None
        for action in actions if isinstance(actions, list) else []:
            source_type = as_str(action.get("digitalSourceType")) if isinstance(action, dict) else None
            if source_type:
                return source_type, _software_agent(action, manifest)
    return None, None


def _software_agent(action: dict, manifest: dict) -> str | None:
    agent = _agent(action.get("softwareAgent"))
    index = action.get("softwareAgentIndex")  # actions v2 may point into the claim's generator list instead
    infos = manifest.get("claim_generator_info")
    if agent is None and isinstance(index, int) and isinstance(infos, list) and 0 <= index < len(infos):
        agent = _agent(infos[index])
    return agent


def _failures(results) -> str:
    active = results.get("activeManifest") if isinstance(results, dict) else None
    failures = active.get("failure") if isinstance(active, dict) else None
    codes = [as_str(f.get("code")) for f in failures if isinstance(f, dict)] if isinstance(failures, list) else []
    codes = [code for code in codes if code and code != _UNTRUSTED]
    return f": {', '.join(codes[:_MAX_FAILURES])}" if codes else ""
