# The Checkpointer: saves and restores a run's parts (engine, center shards, trainer state) as one checkpoint.
"""torchtitan's idea, for the parts of a FaceCL run: whatever is saved is a `Stateful` (state_dict /
load_state_dict), and one object decides where each piece goes on disk.

    checkpointer = Checkpointer(run_dir / "checkpoints", ctx, engine=strategy, head=head_part,
                                states={"schedulers": ..., "data": ..., "history": ...}, identity=make_identity)
    checkpointer.save(step)              # collective: every rank calls it
    restored = checkpointer.load(path)   # collective; returns the step and who wrote the checkpoint

Where the pieces go (toolkit/checkpoint/layout.py):
- one process with an engine whose state fits in a file (single, DDP): one step file holding everything;
- otherwise a step folder: rank 0 writes trainer.pt, every rank its center shard (head_rankNNNNN.pt), and the
  engine writes its own folder through its checkpoint format (DeepSpeed's tag folder, FSDP2's DCP files).

trainer.pt holds the run identity (checked on load: a checkpoint of another model, data or engine layout is
refused with the key that differs), a run id (the entries of one run, across restarts, share it: only they are
pruned or replaced), the world size, every rank's RNG state, the engine's in-file state and each named state.

The engine part (a toolkit.parallel strategy) provides: `writes_folder`, `state_for_file()`,
`load_from_file(state)`, `save_folder(folder)`, `load_folder(folder)`, `weights_finite()`, `sync_buffers()`,
`count_parameters()`, and `world_size_change_hint` (said when its identity refuses another world size).
The head part provides `shard_state()`, `load_shards(shards, source)`, `weights_finite()`, `count_parameters()`.
"""

from __future__ import annotations

import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from toolkit.checkpoint.disk_space import checked_save, expected_checkpoint_bytes
from toolkit.checkpoint.files import CheckpointFolder, load_checkpoint, read_payload, trainer_file_of, write_payload
from toolkit.checkpoint.layout import HEAD_SHARD_FILE, TRAINER_FILE, head_shard_file
from toolkit.checkpoint.rng import capture_rng_state, restore_rng_state
from toolkit.checkpoint.source import open_checkpoint, source_of
from toolkit.distributed import DistributedContext
from toolkit.errors import CheckpointError, FaceCLError


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class StateAdapter:
    """A Stateful made of two functions (for state that lives in several attributes of its owner)."""

    def __init__(self, save: Callable[[], Any], load: Callable[[Any], None]):
        self._save, self._load = save, load

    def state_dict(self):
        return self._save()

    def load_state_dict(self, state) -> None:
        self._load(state)


@dataclass
class Restored:
    """What `Checkpointer.load` read."""

    source: Path              # the checkpoint entry read (a converted copy, after a world-size change)
    step: int
    world_size: int           # of the job that wrote it
    payload: dict[str, Any]   # the trainer file
    origin: Path | None = None   # the entry the path named (before any conversion)


def run_id_of(entry: Path) -> str | None:
    """The run id recorded in a checkpoint entry's trainer file (None: unreadable, or written before run ids)."""
    try:
        return read_payload(trainer_file_of(entry), mmap=True).get("run_id")
    except (CheckpointError, OSError):
        return None


class Checkpointer:
    def __init__(self, checkpoints_dir: Path, ctx: DistributedContext, *, engine, head=None,
                 states: dict[str, Stateful], identity: Callable[[Path | None], dict[str, Any]],
                 keep_last: int = 0, say: Callable[[str], None] = print):
        self.folder = CheckpointFolder(checkpoints_dir, keep_last)
        self.ctx = ctx
        self.engine = engine
        self.head = head
        self.states = states
        self.identity = identity
        self.say = say
        # One file only for a single process whose engine keeps its state in a file; otherwise a folder.
        self.in_folder = engine.writes_folder or ctx.world_size > 1
        # The same id on every rank (a collective: every rank builds its Checkpointer at the same point).
        self.run_id: str = ctx.broadcast_object(uuid.uuid4().hex[:16])
        self.temporary_entries: list[Path] = []   # converted copies made for a resume (removed after a save)

    # ----- what is on disk -------------------------------------------------------------------------------
    def latest(self) -> Path | None:
        return self.folder.latest()

    def remove_stale_temporaries(self) -> list[Path]:
        """What crashed saves left in this run's checkpoints folder (rank 0 removes and reports them)."""
        removed = self.folder.remove_stale_temporaries() if self.ctx.is_main else []
        for path in removed:
            self.say(f"removed {path.name}: left in {self.folder.folder} by an interrupted save")
        self.ctx.barrier()
        return removed

    # ----- save ----------------------------------------------------------------------------------------
    def parts(self) -> list:
        return [self.engine, *([self.head] if self.head is not None else [])]

    def weights_finite(self) -> bool:
        """Whether every part's weights (and floating buffers) are finite on every rank (collective)."""
        finite = torch.stack([part.weights_finite() for part in self.parts()]).min()
        if self.ctx.world_size > 1:
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN, group=self.ctx.group)
        return bool(finite > 0)

    def trainer_state(self) -> dict[str, Any]:
        """Everything but the engine's own files and the center shards; RNG of all ranks (collective)."""
        return {"run": self.identity(None), "run_id": self.run_id, "engine": self.engine.state_for_file(),
                "world_size": self.ctx.world_size, "rng_per_rank": self.ctx.all_gather_objects(capture_rng_state()),
                **{name: state.state_dict() for name, state in self.states.items()}}

    def save(self, step: int) -> Path | None:
        """Write the checkpoint of `step` (all ranks call this). Never from non-finite weights: such a save is
        refused with a warning, so retention cannot replace good checkpoints with it."""
        if not self.weights_finite():
            self.say(f"warning: step {step}: weights are not finite; no checkpoint written (the last one, "
                     f"{self.latest() or 'none'}, is kept)")
            return None
        self.engine.sync_buffers()
        state = self.trainer_state()
        shard = self.head.shard_state() if self.head is not None else None
        # About: every tensor of the model state, x 3 for the optimizer's states (exact after the first save).
        tensor_bytes = 3 * 4 * sum(part.count_parameters() for part in self.parts())
        needed = expected_checkpoint_bytes(self.latest(), tensor_bytes)
        path = checked_save(self.folder.folder, step, needed, lambda: self._write(step, state, shard),
                            lambda: self.folder.discard_partial(step), self.say)
        self.ctx.barrier()
        self.say(f"checkpoint saved: {path}")
        if self.ctx.is_main:   # converted copies of the resumed checkpoint are not needed any more
            for entry in self.temporary_entries:
                shutil.rmtree(entry, ignore_errors=True)
        self.temporary_entries.clear()
        return path

    def _write(self, step: int, state: dict, shard: dict | None) -> Path | None:
        if not self.in_folder:
            return self.folder.save(step, {**state, "head_shards": [shard] if shard else []})
        partial = self.folder.start_folder(step) if self.ctx.is_main else None
        partial = Path(self.ctx.broadcast_object(str(partial) if partial else None))
        if self.engine.writes_folder:
            self.engine.save_folder(partial)
        if shard is not None:
            write_payload(partial / head_shard_file(self.ctx.rank), step, shard)
        if self.ctx.is_main:
            write_payload(partial / TRAINER_FILE, step, state)
        self.ctx.barrier()
        return self.folder.commit_folder(step) if self.ctx.is_main else None

    # ----- load ----------------------------------------------------------------------------------------
    def load(self, path: str | Path) -> Restored:
        """Restore every part from a checkpoint; collective. A checkpoint of another world size whose engine
        files are partitioned by rank is first converted, once, by the engine's format (rank 0 writes the copy
        next to this run's checkpoints; it is removed after this run's next save)."""
        payload = load_checkpoint(path, map_location=self.ctx.device)
        source = origin = Path(payload["path"])
        saved_world = int(payload.get("world_size", self.ctx.world_size))
        if saved_world != self.ctx.world_size and self.engine.writes_folder:
            converted = self._copy_for_this_world_size(source, saved_world)
            if converted != source:
                payload = load_checkpoint(converted, map_location=self.ctx.device)
                source = converted
        saved = payload.get("run", {})
        for key, expected in self.identity(source).items():
            if saved.get(key) != expected:
                if key == "engine_format":
                    raise CheckpointError(self._engine_change_message(source, saved.get(key), expected))
                hint = self.engine.world_size_change_hint if key == "world_size" else ""
                raise CheckpointError(f"checkpoint {source} was written by a run with {key}={saved.get(key)!r}; "
                                      f"this run has {key}={expected!r}{hint}")
        self._continue_run(payload.get("run_id"), source)
        # Every file the engine and the head will read, present, complete and safe, before any is read: a
        # missing or cut rank file is one line here instead of a library's traceback on one rank.
        self.engine.checkpoint_format.check(source_of(source, payload))
        if self.engine.writes_folder:
            self.engine.load_folder(source)
        self.engine.load_from_file(payload["engine"])
        if self.head is not None:
            self.head.load_shards(self._saved_head_shards(payload, source), source)
        for name, state in self.states.items():
            try:
                state.load_state_dict(payload.get(name))
            except CheckpointError as exc:
                raise CheckpointError(f"checkpoint {source}: {exc}") from None
        if saved_world == self.ctx.world_size:
            restore_rng_state(payload["rng_per_rank"][self.ctx.rank])
        return Restored(source=source, step=int(payload["step"]), world_size=saved_world, payload=payload,
                        origin=origin)

    @staticmethod
    def _engine_change_message(source: Path, saved: str | None, wanted: str) -> str:
        """A checkpoint written in another engine's format, in plain words, with the way that works."""
        def described(name: str | None) -> str:
            return {"file": "the single-process or DDP engine (the backbone inside trainer.pt)",
                    "deepspeed": "DeepSpeed ZeRO (DeepSpeed's own files)",
                    "fsdp": "FSDP2 (torch.distributed.checkpoint files)"}.get(name, f"the {name} engine")
        return (f"checkpoint {source} was written with {described(saved)}; this run uses {described(wanted)}, "
                f"which cannot take over its optimizer state. Continue with that engine, or start this one from the "
                f"weights: `python launch/convert.py consolidate {source} --out weights.safetensors --with-head`, "
                f"then --set train.init_from=weights.safetensors (the optimizer and schedule start fresh)")

    def _saved_head_shards(self, payload: dict, source: Path) -> list[dict]:
        if payload.get("head_shards"):
            return payload["head_shards"]
        files = sorted(p for p in source.iterdir() if HEAD_SHARD_FILE.match(p.name)) if source.is_dir() else []
        if not files:
            raise CheckpointError(f"checkpoint {source} holds no center shards (head_rank*.pt)")
        expected = [source / head_shard_file(rank) for rank in range(int(payload.get("world_size", len(files))))]
        missing = [path.name for path in expected if not path.is_file()]
        if missing:
            raise CheckpointError(f"checkpoint {source} is incomplete: {len(missing)} of {len(expected)} center shard "
                                  f"files missing ({', '.join(missing[:4])})")
        return [read_payload(file) for file in expected]

    def _continue_run(self, saved_run_id: str | None, source: Path) -> None:
        """The resumed run keeps the saved run id, and its earlier entries in this folder become its own (to prune
        and replace). Entries of another run in this folder refuse the resume: the two runs would mix."""
        if saved_run_id is not None:
            self.run_id = saved_run_id
        refusal = None
        if self.ctx.is_main:
            own, foreign = [], []
            for _, entry in self.folder.entries():
                run_id = run_id_of(entry)
                if entry.resolve() == source.resolve() or run_id == saved_run_id:
                    own.append(entry.name)
                elif run_id is not None:   # entries without a run id (older FaceCL) belong to no one: kept
                    foreign.append(entry.name)
            if foreign:
                refusal = (f"{self.folder.folder} holds {len(foreign)} checkpoint(s) of another run (e.g. {foreign[-1]});"
                           f" resuming {source} into it would mix two runs: continue that run with --resume auto, "
                           f"or choose another run.name")
            self.folder.adopt(own)
        refusal = self.ctx.broadcast_object(refusal)
        if refusal:
            raise CheckpointError(refusal)

    def _copy_for_this_world_size(self, source: Path, saved_world: int) -> Path:
        """`source` if the engine's format loads it at this world size, else its converted copy (made by rank 0
        once; a collective)."""
        fmt = self.engine.checkpoint_format
        if fmt.resumes_at_any_world_size(source):
            return source
        target = self.folder.folder / f"{source.name}{fmt.resized_suffix}"
        error = None
        if self.ctx.is_main and not target.exists():
            self.say(f"checkpoint {source} was written by {saved_world} ranks and its {fmt.name} files are partitioned "
                     f"by rank: converting it for any world size into {target} (once)")
            started = time.perf_counter()
            try:
                self.folder.folder.mkdir(parents=True, exist_ok=True)
                fmt.resize(open_checkpoint(source), target)
                self.say(f"converted in {time.perf_counter() - started:.0f} s")
            except FaceCLError as exc:
                error = f"converting {source} for {self.ctx.world_size} ranks failed: {exc}"
        error = self.ctx.broadcast_object(error)
        if error:
            raise CheckpointError(error)
        self.temporary_entries.append(target)
        return target
