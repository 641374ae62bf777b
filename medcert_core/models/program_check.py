"""What a ``torch.export`` program (``.pt2``) may hold and do, checked before any of it runs.

A ``.pt2`` is a zip of JSON (the graph), raw tensor bytes and, optionally, pickles and native code.
``torch.export.load`` would unpickle, extract and dlopen what it finds, and the graph may call any
operator torch has, ``aten::from_file`` (read and write any file) included. medcert accepts a file
only when what it can do is known:

1. **Members** (:func:`check_archive`), read with the reader torch itself uses
   (``torch._C.PyTorchFileReader``): exactly the kinds ``torch.export.save`` writes
   (:data:`ARCHIVE_MEMBERS`), no duplicate or non-normalised name (two members of one name are
   read differently by Python's zipfile and by torch), no native payload (``data/aotinductor/``,
   ``data/executorch/``, ...), no Python object constant, and every pickled part loads with
   ``weights_only=True``.
2. **The serialized graph** (:func:`check_serialized_graph`), before deserialization: every node's
   target is an operator of :data:`PURE_OPERATORS` (or a symbolic-size helper).
3. **The loaded graph** (:func:`check_graph`), before any call: the same allow-list on the resolved
   targets, no higher-order operator or submodule call, and no operator that writes to a user input,
   a parameter or a constant (directly or through a view); the module's own buffers may be written
   (BatchNorm's running statistics).

Every refusal is a ``ValueError`` naming the file and the member or operator.
"""

from __future__ import annotations

import io
import json
import operator
import re
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

ARCHIVE_MEMBERS = tuple(re.compile(pattern) for pattern in (
    r"archive_format", r"archive_version", r"byteorder", r"\.data/version", r"\.data/serialization_id",
    r"models/\w+\.json", r"data/sample_inputs/\w+\.pt",
    r"data/weights/\w+_weights_config\.json", r"data/weights/weight_\d+",
    r"data/constants/\w+_constants_config\.json", r"data/constants/tensor_\d+",
    r"extra/[\w.-]+",
))
NATIVE_PAYLOADS = ("data/aotinductor/", "data/executorch/", "data/mtia", "xl_model_weights/")

# Pure tensor operators a segmentation network needs: their output is a function of their tensor
# arguments only (no file, no storage outside the graph, no uninitialised memory, no raw strides).
PURE_OPERATORS = frozenset("""
    conv1d conv2d conv3d convolution _convolution conv_transpose1d conv_transpose2d conv_transpose3d
    linear addmm mm bmm matmul baddbmm einsum
    batch_norm native_batch_norm _native_batch_norm_legit _native_batch_norm_legit_no_training
    _native_batch_norm_legit_functional instance_norm layer_norm native_layer_norm group_norm
    native_group_norm rms_norm
    relu relu_ relu6 leaky_relu leaky_relu_ gelu gelu_ silu silu_ sigmoid sigmoid_ tanh tanh_ hardtanh hardtanh_
    elu elu_ selu selu_ celu celu_ prelu _prelu_kernel softplus mish mish_ hardswish hardswish_ hardsigmoid
    hardsigmoid_ softmax _softmax log_softmax _log_softmax log_sigmoid threshold threshold_ glu
    max_pool1d max_pool2d max_pool3d max_pool2d_with_indices max_pool3d_with_indices avg_pool1d avg_pool2d
    avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d _adaptive_avg_pool2d
    _adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d
    upsample_nearest1d upsample_nearest2d upsample_nearest3d _upsample_nearest_exact1d _upsample_nearest_exact2d
    _upsample_nearest_exact3d upsample_linear1d upsample_bilinear2d _upsample_bilinear2d_aa upsample_bicubic2d
    _upsample_bicubic2d_aa upsample_trilinear3d pixel_shuffle pixel_unshuffle
    pad constant_pad_nd reflection_pad1d reflection_pad2d reflection_pad3d replication_pad1d replication_pad2d
    replication_pad3d
    add add_ sub sub_ rsub mul mul_ div div_ neg neg_ abs exp exp2 expm1 log log2 log1p log10 sqrt rsqrt pow
    square reciprocal clamp clamp_ clamp_min clamp_min_ clamp_max clamp_max_ clip minimum maximum where sign
    floor ceil round trunc frac erf erfc sin cos fmod remainder lerp addcmul addcdiv eq ne lt le gt ge
    logical_and logical_or logical_not logical_xor bitwise_not isnan isinf isfinite nan_to_num masked_fill
    masked_fill_
    sum mean amax amin max min argmax argmin var var_mean std std_mean prod linalg_vector_norm logsumexp
    cumsum all any
    view reshape _unsafe_view view_as expand expand_as squeeze unsqueeze flatten unflatten permute transpose t
    contiguous clone alias detach lift_fresh_copy slice select narrow split split_with_sizes chunk unbind
    cat concat concatenate stack repeat tile flip roll movedim swapaxes
    zeros zeros_like ones ones_like full full_like new_zeros new_ones new_full arange linspace scalar_tensor
    _to_copy to type_as copy copy_ fill fill_ zero_ dropout feature_dropout
    sym_size sym_numel sym_stride sym_storage_offset _assert_scalar _assert_tensor_metadata
    sym_constrain_range sym_constrain_range_for_size
""".split())

# Symbolic-size arithmetic of programs exported with a dynamic batch (plain Python on ints).
SIZE_FUNCTIONS = {f"_operator.{name}": getattr(operator, name) for name in (
    "getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "eq", "ne", "lt", "le", "gt", "ge")}
SIZE_FUNCTIONS |= {f"torch.{name}": getattr(torch, name) for name in (
    "sym_int", "sym_float", "sym_max", "sym_min", "sym_not")}

# Operators that write their running-statistics arguments without saying so in their schema.
UNDECLARED_WRITES = {"batch_norm": (3, 4), "native_batch_norm": (3, 4), "instance_norm": (3, 4)}


def archive_records(content: bytes, reader: torch._C.PyTorchFileReader, path: Path) -> list[str]:
    """The member names of the archive ``content`` relative to its top folder, as ``reader`` (torch's, which
    ``torch.export.load`` uses) lists them; ValueError on duplicate, non-normalised or misplaced names, or
    when Python's zipfile lists other members."""
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        names = [info.filename for info in archive.infolist()]
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise ValueError(f"{path}: the member {duplicates[0]} appears more than once; Python's zipfile and torch "
                         f"would read different copies of it (a way to hide a payload from a check); medcert "
                         f"refuses the file")
    for name in names:
        if "\\" in name or any(part in ("", ".", "..") for part in name.split("/")):  # also a leading "/"
            raise ValueError(f"{path}: the member name {name!r} is not a normalised relative path; medcert "
                             f"refuses the file")
    folders = {name.split("/", 1)[0] for name in names}
    if len(folders) != 1 or any("/" not in name for name in names):
        raise ValueError(f"{path}: a torch.export.save archive keeps every member in one top folder; this one has "
                         f"{sorted(folders)[:5]}; medcert refuses the file")
    records = sorted(reader.get_all_records())
    relative = sorted(name.split("/", 1)[1] for name in names)
    if records != relative:
        raise ValueError(f"{path}: torch's reader and Python's zipfile list different members "
                         f"({sorted(set(records) ^ set(relative))[:5]}); medcert refuses the file")
    return records


def check_archive(content: bytes, path: Path) -> dict[str, bytes]:
    """Check the members of a ``.pt2`` (see the module docstring) -> {member: bytes} as torch reads them."""
    reader = torch._C.PyTorchFileReader(io.BytesIO(content))
    records = archive_records(content, reader, path)
    for name in records:
        if name.startswith(NATIVE_PAYLOADS):
            raise ValueError(f"{path}: its member {name} is native code or a compiled artefact (AOTInductor, "
                             f"ExecuTorch), which torch would extract and load as a library; medcert accepts only "
                             f"the graph and tensors of torch.export.save: export without compiling")
        if not any(pattern.fullmatch(name) for pattern in ARCHIVE_MEMBERS):
            raise ValueError(f"{path}: its member {name} is not one torch.export.save writes (expected: "
                             f"{', '.join(pattern.pattern for pattern in ARCHIVE_MEMBERS)}); medcert refuses the file")
    if "archive_format" not in records or "archive_version" not in records:
        raise ValueError(f"{path}: not a torch.export.save archive (no archive_format / archive_version); re-save it "
                         f"with torch.export.save of torch >= 2.8")
    members = {name: bytes(reader.get_record(name)) for name in records}
    _check_pickled_parts(members, path)
    return members


def _pickled_parts(members: dict[str, bytes], path: Path) -> Iterator[str]:
    """The members ``torch.export.load`` would unpickle; ValueError for Python object constants."""
    yield from (name for name in members if name.endswith(".pt"))
    for config_name in (name for name in members if name.endswith(("_weights_config.json", "_constants_config.json"))):
        folder = config_name.rsplit("/", 1)[0]
        for entry in _json(members[config_name], config_name, path).get("config", {}).values():
            part = str(entry.get("path_name", ""))
            if part.startswith(("custom_obj", "opaque")):
                raise ValueError(f"{path} holds a Python object as a constant ({folder}/{part}): loading it would run "
                                 f"code from the file; medcert refuses it")
            if entry.get("use_pickle"):
                yield f"{folder}/{part}"


def _check_pickled_parts(members: dict[str, bytes], path: Path) -> None:
    for name in _pickled_parts(members, path):
        if name not in members:
            raise ValueError(f"{path}: its part {name} is named by a config but missing; medcert refuses the file")
        try:
            torch.load(io.BytesIO(members[name]), map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"{path}: its part {name} does not load as plain tensors (weights only), so loading "
                             f"it would run code from the file; medcert refuses it ({error})") from error


def _json(content: bytes, name: str, path: Path) -> dict[str, Any]:
    try:
        value = json.loads(content)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: its member {name} is not JSON ({error})") from error
    if not isinstance(value, dict):
        raise ValueError(f"{path}: its member {name} is not a JSON object")
    return value


def _serialized_targets(value: Any) -> Iterator[str]:
    """Every node target of a serialized graph, nested graphs included (nodes: dicts with target and inputs)."""
    if isinstance(value, dict):
        if isinstance(value.get("target"), str) and "inputs" in value:
            yield value["target"]
        for item in value.values():
            yield from _serialized_targets(item)
    elif isinstance(value, list):
        for item in value:
            yield from _serialized_targets(item)


def allowed_target_name(target: str) -> bool:
    """Whether a serialized target (``torch.ops.aten.conv2d.default``, ``_operator.getitem``) is allowed."""
    match = re.fullmatch(r"torch\.ops\.aten\.(\w+)\.(\w+)", target)
    return (match is not None and match.group(1) in PURE_OPERATORS) or target in SIZE_FUNCTIONS


def check_serialized_graph(members: dict[str, bytes], path: Path) -> None:
    """Every node target of every ``models/*.json`` is allowed, before torch deserializes it."""
    for name in (name for name in members if name.startswith("models/")):
        for target in _serialized_targets(_json(members[name], name, path)):
            if not allowed_target_name(target):
                raise ValueError(_operator_refusal(path, target))


def _operator_refusal(path: Path, target: str) -> str:
    return (f"{path}: its graph calls {target}, which is not a pure tensor operator medcert allows in a model file "
            f"(it could read or write files, storage outside the graph or uninitialised memory, or run code); "
            f"medcert refuses it. If your network needs it, load the model in your own code and give "
            f"--model package.module:function")


def _operator_name(target: Any) -> str | None:
    """The aten base name of an OpOverload target (``conv2d``), else None."""
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten":
        return target._opname
    return None


def _is_allowed_target(target: Any) -> bool:
    name = _operator_name(target)
    return (name is not None and name in PURE_OPERATORS) or any(target is function
                                                                for function in SIZE_FUNCTIONS.values())


def _written_arguments(node: torch.fx.Node) -> list[Any]:
    """The arguments a call writes to: schema arguments marked ``(a!)`` and the running statistics of
    operators that write them undeclared."""
    schema = node.target._schema
    written = [index for index, argument in enumerate(schema.arguments)
               if argument.alias_info is not None and argument.alias_info.is_write]
    written += UNDECLARED_WRITES.get(_operator_name(node.target) or "", ())
    values = []
    for index in written:
        argument = schema.arguments[index]
        values.append(node.args[index] if index < len(node.args) else node.kwargs.get(argument.name))
    return [value for value in values if isinstance(value, torch.fx.Node)]


def _alias_roots(node: torch.fx.Node) -> set[torch.fx.Node]:
    """The placeholders or fresh tensors whose storage ``node`` may share (through views and getitem)."""
    roots, stack, seen = set(), [node], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        target = current.target
        if current.op == "call_function" and target is operator.getitem:
            stack.append(current.args[0])
        elif current.op == "call_function" and isinstance(target, torch._ops.OpOverload) and any(
                returned.alias_info is not None for returned in target._schema.returns):
            stack.extend(argument for argument in current.args if isinstance(argument, torch.fx.Node))
        else:
            roots.add(current)
    return roots


def check_graph(program: torch.export.ExportedProgram, path: Path) -> None:
    """The loaded program's graph (and any nested graph) calls only allowed operators and writes only to
    the module's buffers and its own intermediate tensors; ValueError naming the operator otherwise."""
    signature = program.graph_signature
    if signature.user_inputs_to_mutate:
        raise ValueError(f"{path}: the program writes to its input ({', '.join(signature.user_inputs_to_mutate)}); "
                         f"a segmenter must leave the image it is given unchanged; medcert refuses it")
    buffers = set(signature.inputs_to_buffers)
    for module in program.graph_module.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            if node.op != "call_function" or not _is_allowed_target(node.target):
                raise ValueError(_operator_refusal(path, f"{node.op} {node.target}"))
            if _operator_name(node.target) is None:
                continue
            for written in _written_arguments(node):
                protected = [root.name for root in _alias_roots(written)
                             if root.op in ("placeholder", "get_attr") and root.name not in buffers]
                if protected:
                    raise ValueError(f"{path}: its graph's {node.target} writes to {', '.join(protected)} (an "
                                     f"input, a parameter or a constant); a segmenter may write only to its own "
                                     f"buffers and intermediate tensors; medcert refuses it")
