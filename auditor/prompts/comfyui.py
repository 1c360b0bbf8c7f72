"""ComfyUI: the `prompt` chunk (the API graph ComfyUI executed) and, as a fallback, the `workflow` chunk (the editor's
graph, converted to the API shape for the core nodes).

API graph: {"id": {"class_type": "KSampler", "inputs": {"seed": 1, "positive": ["6", 0], ...}}, ...}, where a
list [node_id, output_slot] is a link to another node's output. A graph can hold several text encoders
(positive, negative, refiner, hires pass), so the prompt is the text wired to a sampler's `positive` input,
followed back through conditioning nodes, not simply the first text found.
"""

from __future__ import annotations

from collections import deque

from .base import (
    GenerationMetadata,
    Unreadable,
    as_float,
    as_int,
    as_str,
    load_json,
    positive,
)

Graph = dict[str, dict]

# Real graphs have hundreds of nodes and take a few thousand node visits to read. The caps keep a forged one
# (a megabyte of samplers sharing one long chain) from costing minutes: all walks spend from one visit budget.
MAX_NODES = 10_000
VISIT_BUDGET = 25_000

_TEXT_KEYS = ("text", "text_g", "prompt", "string", "value", "text_positive")
_ENCODER_TEXT_KEYS = ("text_g", "text_l", "t5xxl", "clip_g", "clip_l")
_CONDITIONING_HINTS = ("cond",)
# Inputs of a conditioning node that lead to more conditioning; anything else (clip, image, control_net, mask)
# leads to encoders or pixels, where a walk would only find unrelated text.


def _is_link(value) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str | int)
        and not isinstance(value[0], bool)
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
    )


def validate(graph) -> Graph:
    """Nodes keyed by id, with dict inputs and no link cycles (ComfyUI itself cannot run a cyclic graph, so one
    means forged or corrupt metadata). Dangling links are allowed: saved graphs often reference pruned nodes."""
    if not isinstance(graph, dict):
        raise Unreadable(f"ComfyUI graph unreadable: a JSON {type(graph).__name__}, not an object")
    if len(graph) > MAX_NODES:
        raise Unreadable(f"ComfyUI graph unreadable: {len(graph)} nodes, over the {MAX_NODES} read")
    nodes: Graph = {}
    for node_id, node in graph.items():
        if not isinstance(node, dict):
            raise Unreadable(f"ComfyUI graph unreadable: node {node_id!r} is a {type(node).__name__}")
        inputs = node.get("inputs", {})
        if not isinstance(inputs, dict):
            raise Unreadable(f"ComfyUI graph unreadable: node {node_id!r} inputs is a {type(inputs).__name__}")
        kind = node.get("class_type")
        nodes[str(node_id)] = {"class_type": kind if isinstance(kind, str) else "", "inputs": inputs}
    _check_acyclic(nodes)
    return nodes


def _links(node: dict):
    for value in node["inputs"].values():
        if _is_link(value):
            yield str(value[0])


def _check_acyclic(nodes: Graph) -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in nodes:
        if root in state:
            continue
        state[root] = 1
        stack = [(root, _links(nodes[root]))]
        while stack:
            node_id, children = stack[-1]
            for child in children:
                if child not in nodes:
                    continue
                if state.get(child) == 1:
                    raise Unreadable(f"ComfyUI graph unreadable: link cycle through node {child!r}")
                if child not in state:
                    state[child] = 1
                    stack.append((child, _links(nodes[child])))
                    break
            else:
                state[node_id] = 2
                stack.pop()


class _Resolver:
    def __init__(self, nodes: Graph):
        self.nodes = nodes
        self.budget = VISIT_BUDGET

    def visit(self) -> None:
        self.budget -= 1
        if self.budget < 0:
            raise Unreadable(f"ComfyUI graph unreadable: resolving it took over {VISIT_BUDGET} node visits")

    def node(self, link) -> dict | None:
        return self.nodes.get(str(link[0])) if _is_link(link) else None

    def scalar(self, inputs: dict, key: str, also: tuple[str, ...] = ()):
        """An input's value, following links into primitive nodes (PrimitiveInt, seed widgets, string literals)."""
        value, seen = inputs.get(key), set()
        while _is_link(value) and str(value[0]) not in seen:
            self.visit()
            seen.add(str(value[0]))
            target = self.nodes.get(str(value[0]))
            if target is None:
                return None
            found = [
                target["inputs"][k] for k in (key, *also, "value", "int", "float", "number") if k in target["inputs"]
            ]
            value = found[0] if found else None
        return None if _is_link(value) else value

    def texts(self, link, polarity: str) -> list[str]:
        """Texts of the encoders wired to a conditioning link, through combine/concat/area/ControlNet nodes."""
        out: list[str] = []
        stack, seen = [link], set()
        while stack:
            current = stack.pop()
            node = self.node(current)
            key = (str(current[0]), current[1]) if _is_link(current) else None
            if node is None or key in seen:
                continue
            self.visit()
            seen.add(key)
            inputs = node["inputs"]
            own = self._own_text(node, polarity)
            if own is not None:
                if own and own not in out:
                    out.append(own)
                continue
            if _is_link(inputs.get("positive")) and _is_link(inputs.get("negative")):
                # ControlNetApplyAdvanced and kin pass both through: output slot 0 is positive, 1 negative.
                stack.append(inputs["positive"] if current[1] == 0 else inputs["negative"])
                continue
            # Reversed so the first conditioning input is walked first and its text comes first.
            stack.extend(
                v for k, v in reversed(inputs.items()) if _is_link(v) and any(h in k for h in _CONDITIONING_HINTS)
            )
        return out

    def _own_text(self, node: dict, polarity: str) -> str | None:
        """The node's text if it is an encoder ("" when it is one with empty text), else None."""
        inputs = node["inputs"]
        pair = [k for k in _ENCODER_TEXT_KEYS if k in inputs]
        if pair:
            # SDXL/SD3/Flux feed one text per text encoder; usually the same, and when not, all shaped the image.
            texts = ((self._string(inputs, k) or "").strip() for k in pair)
            return "\n".join(t for t in dict.fromkeys(texts) if t)
        if "TextEncode" in node["class_type"] or any(isinstance(inputs.get(k), str) for k in ("text", "prompt")):
            for key in ("text", "prompt"):
                if key in inputs:
                    return (self._string(inputs, key) or "").strip()
            return ""
        if isinstance(inputs.get(polarity), str):  # loaders that take the prompts as widgets (Efficiency nodes)
            return inputs[polarity].strip()
        return None

    def _string(self, inputs: dict, key: str) -> str | None:
        value = self.scalar(inputs, key, _TEXT_KEYS)
        return value if isinstance(value, str) else None

    def upstream(self, link, accept, via: tuple[str, ...] | None = None, stop=None) -> dict | None:
        """The nearest node upstream of a link that `accept`s, walking inputs named in `via` (all when None)."""
        queue, seen = deque([link] if _is_link(link) else []), set()
        while queue:
            node_id = str(queue.popleft()[0])
            node = self.nodes.get(node_id)
            if node is None or node_id in seen:
                continue
            self.visit()
            seen.add(node_id)
            if accept(node):
                return node
            if stop is not None and stop(node):
                continue
            queue.extend(v for k, v in node["inputs"].items() if _is_link(v) and (via is None or k in via))
        return None


def _is_sampler(node: dict) -> bool:
    inputs = node["inputs"]
    if "Sampler" in node["class_type"] and (_is_link(inputs.get("positive")) or _is_link(inputs.get("guider"))):
        return True
    return _is_link(inputs.get("positive")) and any(
        k in inputs for k in ("seed", "noise_seed", "steps", "latent_image")
    )


def _is_empty_latent(node: dict) -> bool:
    return "Empty" in node["class_type"] and "Latent" in node["class_type"]


def read_graph(nodes: Graph, md: GenerationMetadata) -> GenerationMetadata:
    resolver = _Resolver(nodes)
    samplers = [(nid, n) for nid, n in nodes.items() if _is_sampler(n)]

    def first_pass(node: dict) -> bool:
        # The txt2img pass (its latent comes from an empty latent, not from another sampler) sets the size;
        # hires and refiner passes normally reuse its prompt.
        latent = node["inputs"].get("latent_image", node["inputs"].get("latent"))
        found = resolver.upstream(latent, lambda n: _is_empty_latent(n) or _is_sampler(n))
        return found is not None and not _is_sampler(found)

    samplers.sort(key=lambda item: (not first_pass(item[1]), _id_order(item[0])))
    for index, (_, sampler) in enumerate(samplers):
        inputs = sampler["inputs"]
        # SamplerCustomAdvanced takes its conditioning and cfg from a guider node.
        guider = resolver.node(inputs.get("guider")) if "positive" not in inputs else None
        conditioning = guider["inputs"] if guider else inputs
        pos = next((conditioning[k] for k in ("positive", "conditioning", "cond1") if k in conditioning), None)
        texts = resolver.texts(pos, "positive") if _is_link(pos) else []
        if not texts and index < len(samplers) - 1:
            continue  # e.g. an unconditioned upscale pass; another sampler may carry the prompt
        neg = conditioning.get("negative")
        md.prompt = "\n".join(texts) or None
        md.negative_prompt = ("\n".join(resolver.texts(neg, "negative")) or None) if _is_link(neg) else None
        md.seed = as_int(_first(resolver, inputs, ("seed", "noise_seed"), via=("noise",)))
        md.steps = as_int(_first(resolver, inputs, ("steps",), via=("sigmas",)))
        md.sampler = as_str(_first(resolver, inputs, ("sampler_name",), via=("sampler",)))
        md.cfg_scale = as_float(_first(resolver, conditioning, ("cfg",)))
        model = resolver.upstream(inputs.get("model", conditioning.get("model")), _is_loader, via=("model",))
        if model is not None:
            md.model_name = _model_name(resolver, model)
        latent = inputs.get("latent_image", inputs.get("latent"))
        size_node = resolver.upstream(latent, _is_empty_latent, stop=_is_sampler)
        if size_node is not None:
            md.width = positive(resolver.scalar(size_node["inputs"], "width"))
            md.height = positive(resolver.scalar(size_node["inputs"], "height"))
        break
    if md.model_name is None:
        loaders = sorted((nid for nid, n in nodes.items() if _is_loader(n)), key=_id_order)
        md.model_name = _model_name(resolver, nodes[loaders[0]]) if loaders else None
    if md.prompt is None and not samplers:
        # No sampler (a partial export) means no wiring to follow: the first encoder is a guess, and said to be one.
        encoders = sorted((nid for nid, n in nodes.items() if n["class_type"] == "CLIPTextEncode"), key=_id_order)
        texts = [resolver._own_text(nodes[e], "positive") for e in encoders]
        md.prompt = next((t for t in texts if t), None)
        if md.prompt is not None:
            md.warnings.append("ComfyUI graph has no sampler: the prompt is the first text encoder's text, a guess")
    return md


def _first(resolver: _Resolver, inputs: dict, keys: tuple[str, ...], via: tuple[str, ...] = ()):
    for key in keys:
        if key in inputs:
            return resolver.scalar(inputs, key, keys)
    for key in via:  # SamplerCustomAdvanced: seed in RandomNoise, steps in BasicScheduler, name in KSamplerSelect
        node = resolver.node(inputs.get(key))
        if node is not None:
            for k in keys:
                if k in node["inputs"]:
                    return resolver.scalar(node["inputs"], k, keys)
    return None


_MODEL_KEYS = ("ckpt_name", "unet_name", "model_name", "model_path")


def _is_loader(node: dict) -> bool:
    return any(k in node["inputs"] for k in _MODEL_KEYS) and "Loader" in node["class_type"]


def _model_name(resolver: _Resolver, node: dict) -> str | None:
    for key in _MODEL_KEYS:
        if key in node["inputs"]:
            return as_str(resolver.scalar(node["inputs"], key))
    return None


def _id_order(node_id: str):
    head = node_id.split(":")[0]
    return (0, int(head), node_id) if head.isdigit() and len(head) < 20 else (1, 0, node_id)


def is_graph(data: dict) -> bool:
    return bool(data) and all(isinstance(n, dict) and "class_type" in n for n in list(data.values())[:50])


def parse_graph(data, raw: str | None, source: str = "comfyui") -> GenerationMetadata:
    return read_graph(validate(data), GenerationMetadata(source=source, generator="ComfyUI", raw=raw))


def parse_prompt(text: str) -> GenerationMetadata:
    return parse_graph(load_json(text, "ComfyUI prompt graph"), text)


# Widget order of the core nodes in the editor's `workflow` JSON (widgets_values is positional; None marks the
# "control after generate" widget the editor adds after seeds).
_WIDGETS = {
    "KSampler": ["seed", None, "steps", "cfg", "sampler_name", "scheduler", "denoise"],
    "KSamplerAdvanced": [
        "add_noise",
        "noise_seed",
        None,
        "steps",
        "cfg",
        "sampler_name",
        "scheduler",
        "start_at_step",
        "end_at_step",
        "return_with_leftover_noise",
    ],  # fmt: skip
    "CLIPTextEncode": ["text"],
    "CLIPTextEncodeSDXL": ["width", "height", "crop_w", "crop_h", "target_width", "target_height", "text_g", "text_l"],
    "CLIPTextEncodeSDXLRefiner": ["ascore", "width", "height", "text"],
    "EmptyLatentImage": ["width", "height", "batch_size"],
    "EmptySD3LatentImage": ["width", "height", "batch_size"],
    "CheckpointLoaderSimple": ["ckpt_name"],
    "UNETLoader": ["unet_name", "weight_dtype"],
    "RandomNoise": ["noise_seed", None],
    "KSamplerSelect": ["sampler_name"],
    "BasicScheduler": ["scheduler", "steps", "denoise"],
    "CFGGuider": ["cfg"],
    "PrimitiveNode": ["value", None],
}


def workflow_to_graph(workflow) -> Graph:
    if not isinstance(workflow, dict) or not isinstance(workflow.get("nodes"), list):
        raise Unreadable("ComfyUI workflow unreadable: no node list")
    links = {}
    for link in workflow.get("links") or []:
        if isinstance(link, list) and len(link) >= 5:
            links[link[0]] = [str(link[1]), link[2]]
        elif isinstance(link, dict):
            links[link.get("id")] = [str(link.get("origin_id")), link.get("origin_slot")]
    graph: Graph = {}
    for node in workflow["nodes"]:
        if not isinstance(node, dict) or node.get("mode") in (2, 4):  # muted or bypassed: not executed
            continue
        kind = str(node.get("type", ""))
        widgets = node.get("widgets_values")
        inputs = {}
        if isinstance(widgets, list):
            names = _WIDGETS.get(kind, ["value"])
            inputs = {name: value for name, value in zip(names, widgets) if name is not None}
        elif isinstance(widgets, dict):
            inputs = dict(widgets)
        for slot in node.get("inputs") or []:
            if isinstance(slot, dict) and isinstance(slot.get("name"), str) and _is_link(links.get(slot.get("link"))):
                inputs[slot["name"]] = links[slot["link"]]
        graph[str(node.get("id"))] = {"class_type": kind, "inputs": inputs}
    # Reroute nodes are editor-only wiring: link straight to what they forward.
    for node in graph.values():
        for key, value in node["inputs"].items():
            hops = 0
            while _is_link(value) and graph.get(value[0], {}).get("class_type") == "Reroute" and hops < len(graph):
                value, hops = next(iter(graph[value[0]]["inputs"].values()), None), hops + 1
            node["inputs"][key] = value
    return graph


def is_workflow(data: dict) -> bool:
    return isinstance(data.get("nodes"), list) and "links" in data


def parse_workflow(text: str) -> GenerationMetadata:
    return parse_graph(workflow_to_graph(load_json(text, "ComfyUI workflow")), text)
