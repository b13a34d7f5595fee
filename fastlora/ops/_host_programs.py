"""Host programs: the launches of one Triton op call, recorded once per input structure and replayed.

A planned launch (``_prebound``) still runs its call site's Python: sizes, strides, the
configuration rules, the argument tuple, the signature. For a training step of a small layer that
is most of the host time left (census host table: ~45 µs of the step's ~125, with the launches'
hit paths ~14 and the allocations ~14). But all of it is a function of the call's *structure*: the
inputs' shapes, strides, dtypes and 16-byte alignments, the scalars (scaling, the dropout
probability, which gradients are needed), the matmul precision, the device and Triton's options.
Only the tensors' addresses and the dropout seed change from call to call.

``run(tag, body, inputs, scalars, seed, device)`` therefore keys a *program* on that structure. The
first call of a key runs ``body`` normally while recording (``Recorder``) every keyed launch it makes
(``_prebound.launch_keyed`` reports them): its plan, its grid (evaluated; M is in the key), and its
arguments, each classified as an input (by identity), a buffer the call allocated (a tensor
``_triton_common._empty`` returned during the call: its shape and dtype), the stream's persistent
flag workspace or flag dummy, the seed (the ``do_not_specialize`` positions, which hold it) or a
constant. A later call of the key
allocates the same buffers through ``_triton_common._empty`` (so the tests' poisoning still
applies), fetches the stream's flag workspace, substitutes its inputs, buffers and seed into the
recorded argument lists and calls the plans: the same launches with the same arguments, without the
sites' Python. A recording whose first-call launches were not all planned yet stores nothing (the
next call records again); one that meets what a replay could not reproduce (the generic launch
path, a launcher that is not Triton's, a tensor the call did not allocate such as a view, two
inputs that are one tensor, another op's call inside it) marks its key as never replayed. Under a
CUDA-graph capture programs are not used (the capture's flag buffers are its own).

``FASTLORA_PREBOUND_CHECK=1`` runs the body on every replayed call as well (recording it) and raises
if its launches differ from the program's. ``FASTLORA_HOST_PROGRAMS=0`` turns programs off. Programs
live in a table inside ``_prebound``'s plan table, so they are cleared and stood in for (the census)
with the plans; the table is bounded on its own (``_MAX_PROGRAMS``).
"""

from __future__ import annotations

import os

import torch

from . import _prebound, _triton_common

ENABLED = os.environ.get("FASTLORA_HOST_PROGRAMS", "1") != "0"

# Source kinds of a recorded argument.
_INPUT, _BUFFER, _FLAGS, _DUMMY, _SEED = range(5)


class _Failed(Exception):
    """The recording cannot become a program (see the module doc)."""


class _NotThisCall(_Failed):
    """This call cannot become a program, another of its structure may (two inputs that are one tensor)."""


class Recorder:
    """What one call launches (``_prebound.launch_keyed`` calls ``step`` for each planned launch,
    ``fail`` for anything it cannot replay) and allocates (``allocated``: the ids of the tensors
    ``_triton_common._empty`` returned meanwhile, with the tensors kept alive until compiled)."""

    __slots__ = ("steps", "ok", "permanent", "allocated")

    def __init__(self):
        self.steps: list = []
        self.ok = True
        self.permanent = False  # a failure that the next call of the key would meet again
        self.allocated: dict[int, torch.Tensor] = {}

    def step(self, plan, grid, args, seed_positions) -> None:
        if callable(grid):
            grid = grid(plan.meta)
        self.steps.append((plan, tuple(grid), args, seed_positions))

    def fail(self, permanent: bool = False) -> None:
        """Not replayable: a launch not planned yet (the next call may be), or (``permanent``) one
        the programs cannot replay at all (the generic launch path, a launcher that is not Triton's)."""
        self.ok = False
        self.permanent = self.permanent or permanent


class Program:
    """A recorded call: buffers to allocate, launches to make, outputs to return (module doc)."""

    __slots__ = ("buffers", "flags", "steps", "outputs")

    def __init__(self, buffers, flags, steps, outputs):
        self.buffers, self.flags, self.steps, self.outputs = buffers, flags, steps, outputs

    def replay(self, inputs: tuple, seed: int, device: torch.device, launched: list | None = None):
        """The recorded launches with this call's tensors and seed; their outputs. ``launched``
        (the check): also gets the buffers it allocated, then each launch's ``(plan, grid, args)``."""
        empty = _triton_common._empty
        buffers = [empty(shape, dtype, device) for shape, dtype in self.buffers]
        if launched is not None:
            launched.append(buffers)
        values = [*inputs, *buffers]
        for kind, size in self.flags:  # the current stream's, fetched per call
            if kind == _FLAGS:
                values.append(_triton_common._flag_workspace(device, size))
            else:
                values.append(_triton_common._flag_dummy(device))
        values.append(seed)
        for plan, grid, template, substitutions in self.steps:
            args = list(template)
            for position, source in substitutions:
                args[position] = values[source]
            args = tuple(args)
            if launched is not None:
                launched.append((plan, grid, args))
            plan(args, grid)
        return tuple(None if source is None else values[source] for source in self.outputs)


def _compile(recorder: Recorder, inputs: tuple, outputs: tuple, seed: int) -> Program:
    """The program of a finished recording, or ``_Failed``."""
    if not recorder.ok or not recorder.steps:
        raise _Failed
    sources: dict[int, int] = {}
    for i, t in enumerate(inputs):
        if t is None:
            continue
        if id(t) in sources:
            raise _NotThisCall  # one tensor in two roles: a replay with two could not tell them apart
        sources[id(t)] = i
    flags = getattr(_triton_common._workspaces, "flags", {}).values()
    dummies = getattr(_triton_common._workspaces, "dummies", {}).values()
    flag_ids = {id(t): (_FLAGS, t.numel()) for t in flags}
    flag_ids.update({id(t): (_DUMMY, 1) for t in dummies})
    buffers, flag_specs = [], []

    def source_of(t: torch.Tensor) -> int:
        index = sources.get(id(t))
        if index is not None:
            return index
        spec = flag_ids.get(id(t))
        if spec is not None:
            flag_specs.append(spec)
            index = -len(flag_specs)  # numbered after the buffers once they are all known
        elif id(t) in recorder.allocated:  # a buffer the call allocated (not a view of one)
            buffers.append((tuple(t.shape), t.dtype))
            index = len(inputs) + len(buffers) - 1
        else:
            raise _Failed  # a view, a cached tensor, anything the call did not allocate
        sources[id(t)] = index
        return index

    steps = []
    for plan, grid, args, seed_positions in recorder.steps:
        template, substitutions = list(args), []
        for position, value in enumerate(args):
            if isinstance(value, torch.Tensor):
                substitutions.append((position, source_of(value)))
                template[position] = None
            elif position in seed_positions:
                if value != seed:
                    raise _Failed
                substitutions.append((position, None))  # the seed: resolved below
                template[position] = None
        steps.append((plan, grid, template, substitutions))
    out_sources = []
    for t in outputs:
        if t is None:
            out_sources.append(None)
        elif isinstance(t, torch.Tensor):
            out_sources.append(source_of(t))
        else:
            raise _Failed
    # Final numbering: inputs, buffers, flags, then the seed.
    first_flag = len(inputs) + len(buffers)
    seed_index = first_flag + len(flag_specs)

    def final(index):
        if index is None:
            return seed_index
        return first_flag + (-index - 1) if index < 0 else index

    steps = [
        (plan, grid, tuple(template), tuple((pos, final(src)) for pos, src in subs))
        for plan, grid, template, subs in steps
    ]
    outs = tuple(None if s is None else final(s) for s in out_sources)
    return Program(tuple(buffers), tuple(flag_specs), tuple(steps), outs)


def _structure(t):
    return None if t is None else (t.shape, t.stride(), t.dtype, not t.data_ptr() & 15)


# Programs live in one table inside the plan table (so they are cleared, emptied and stood in for with
# the plans) and are bounded on their own: the key holds the exact row count, and a run of varying
# sequence lengths adds a program per length and layer shape. Full, the table is emptied.
_TABLE = ("host programs",)
_MAX_PROGRAMS = 2048
_NEVER = False  # a key whose calls cannot be replayed (the recorder's permanent failures)


def _table() -> dict:
    table = _prebound._plans.get(_TABLE)
    if table is None:
        table = _prebound._plans[_TABLE] = {}
    return table


def key_of(tag, inputs: tuple, scalars: tuple, device: torch.device) -> tuple:
    """A program's key: what the recorded launches are a function of (module doc)."""
    return (
        "program", tag, tuple(map(_structure, inputs)), scalars, device, _triton_common.matmul_precision(),
        _triton_common.device_limits(device), _prebound._triton_options(),
    )  # fmt: skip


def run(tag, body, inputs: tuple, scalars: tuple, seed: int, device: torch.device):
    """``body()``'s result, through the program of this call's structure where there is one (module
    doc). ``inputs``: every tensor ``body`` reads (None for an absent one), in a fixed order;
    ``scalars``: every other value it depends on (hashable: the call's scalars and the module
    constants the body reads); ``seed``: the int the kernels' seed parameters receive (0 without
    dropout). Call inside ``on_device(device)``."""
    outer = getattr(_prebound._recording, "active", None)
    if outer is not None:  # inside another op's recording: its launches would not be in either program
        outer.fail(permanent=True)
        return body()
    if not (ENABLED and _prebound.ENABLED) or getattr(_triton_common._launch_state, "capturing", False):
        return body()
    try:
        key = key_of(tag, inputs, scalars, device)
    except RuntimeError:  # a tensor without a data pointer
        return body()
    table = _table()
    program = table.get(key)
    if program is _NEVER:
        return body()
    replayed = None
    if program is not None:
        if not _prebound.CHECK:
            return program.replay(inputs, seed, device)
        launched = []  # the check: replay, then run the body too, and compare what each launched
        replayed = (launched, program.replay(inputs, seed, device, launched))
    recorder = Recorder()
    empty = _triton_common._empty  # whatever it is now (the tests' poisoning one included)

    def recording_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        recorder.allocated[id(t)] = t
        return t

    # (Swapped under the launch lock, which the caller holds: no other recording can run meanwhile;
    # another thread's allocation through it is recorded here, harmlessly, and never matched.)
    _prebound._recording.active = recorder
    _triton_common._empty = recording_empty
    try:
        result = body()
    finally:
        _triton_common._empty = empty
        _prebound._recording.active = None
    if replayed is not None:
        _check(tag, inputs, replayed, recorder, result)
        return result
    try:
        recorded = _compile(recorder, inputs, result, seed)
    except _NotThisCall:
        return result
    except _Failed:
        if recorder.permanent or recorder.ok:  # (ok: it recorded, but something could not be classified)
            _store(table, key, _NEVER)
        return result
    _store(table, key, recorded)
    return result


def _store(table: dict, key, value) -> None:
    if len(table) >= _MAX_PROGRAMS:
        table.clear()
    table[key] = value


def _check(tag, inputs, replayed, recorder: Recorder, result) -> None:
    """``FASTLORA_PREBOUND_CHECK``: the replay launched what the body launched, call by call: the same
    plan and grid, equal non-tensor arguments of the same types, the inputs and the stream's flag
    buffers as themselves, and in place of each buffer the body allocated one buffer the replay
    allocated (the same shape, strides and dtype, paired one to one); the outputs likewise, and on a
    GPU equal bit for bit (the kernels are deterministic)."""
    (replay_buffers, *launched), replay_result = replayed
    body_steps = [(plan, grid, args) for plan, grid, args, _ in recorder.steps]
    own = {id(t) for t in inputs if t is not None}
    theirs = {id(t) for t in replay_buffers}
    pairs: dict[int, int] = {}
    paired: set[int] = set()

    def same(x, y) -> bool:
        if not isinstance(y, torch.Tensor):
            return type(x) is type(y) and x == y
        if not isinstance(x, torch.Tensor) or (x.shape, x.stride(), x.dtype) != (y.shape, y.stride(), y.dtype):
            return False
        if x is y:  # an input, or the stream's flags: the replay must pass that very tensor
            return id(y) in own or id(y) not in recorder.allocated
        if id(y) in own or id(y) not in recorder.allocated or id(x) not in theirs:
            return False  # a body buffer stands for a replay buffer, and nothing else does
        if id(y) in pairs:
            return pairs[id(y)] == id(x)
        if id(x) in paired:
            return False
        pairs[id(y)] = id(x)
        paired.add(id(x))
        return True

    ok = recorder.ok and len(launched) == len(body_steps)
    for (p1, g1, a1), (p2, g2, a2) in zip(launched, body_steps):
        ok = ok and p1 is p2 and tuple(g1) == tuple(g2) and len(a1) == len(a2) and all(map(same, a1, a2))
    ok = ok and len(replay_result) == len(result)
    ok = ok and all(x is None if y is None else same(x, y) for x, y in zip(replay_result, result))
    if ok and any(isinstance(y, torch.Tensor) and y.is_cuda for y in result):
        ok = all(x is None or torch.equal(_bits(x), _bits(y)) for x, y in zip(replay_result, result))
    if not ok:
        raise AssertionError(f"fastlora: a host program's replay launched other than its call's body ({tag})")


_INTS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bits as integers (equal NaNs compare equal)."""
    return t.view(_INTS[t.element_size()]) if t.is_floating_point() else t
