"""The COMMIT task table: one row per task the masked transformer knows, and everything that varies by task.

Adding a task is one row in :data:`TASKS` (plus, for a new kind of region or fill, its few lines in
``magvit/conditions.py``). A model's own task list is saved in its ``TransformerConfig.tasks`` (config.json) and fixes
its task-token ids, so a new row never changes the ids of a saved model; an export whose config.json names no task
list has :data:`DEFAULT_TASKS`.

API:

- :class:`Task` (frozen): ``name`` (the model's task and the token shards' ``cond.<name>``), ``cli_name`` and
  ``region`` (``python -m magvit.generate --task CLI_NAME [--region REGION]``), ``condition`` (what the task is
  conditioned on: ``"video"`` a pixel-space condition video, ``"sketch"`` a sketch video, ``"class"`` the class
  label, ``"none"`` nothing), and for ``"video"`` tasks the condition region and fill: ``frames`` (which frames
  show real pixels: ``"first"`` the first ``num_cond_frames``, ``"ends"`` the first and the last, ``"all"``),
  ``area`` (where in those frames: ``"all"``, ``"central"`` the middle half of both axes, ``"vertical"`` the middle
  half of the width, ``"horizontal"`` the middle half of the height, ``"outside_central"`` all but the central
  box) and ``fill`` (the unknown pixels, as MAGVIT's official code builds its condition videos:
  ``"nearest_frame"`` a copy of the nearest known frame (frame prediction: the last given one), ``"linear_blend"``
  the linear blend of the known frames before and after (interpolation), ``"edge"`` the nearest pixel of the known
  box, numpy's ``edge`` padding (outpainting), ``"constant"`` a constant value (inpainting: 0). The frame fills
  need ``area="all"``; ``"edge"`` needs ``frames="all"`` and a box-shaped area (not ``"outside_central"``).
  Derived: ``shard_key`` (the token-shard key of the condition codes, which fill the prefix, or with interior
  conditioning the condition region's masked slots: ``"cond.<name>"``, ``"sketch_codes"`` or ``None``),
  ``has_condition_codes`` (the task is conditioned on codes, in either layout), ``needs_label`` (trains / generates
  only with a class label),
  ``uses_label`` (``False``: the class slot always holds the unconditional token).
- :data:`TASKS`: ``tuple[Task, ...]``, the table; :func:`task` ``(name) -> Task`` (``ValueError`` naming the
  known tasks).
- :data:`TASK_NAMES`, :data:`CONDITION_TASKS` (the ``"video"`` tasks): names, in table order.
- :data:`DEFAULT_TASKS`: the task list of a model whose config.json has none.
- :func:`condition_name` ``(name, num_cond_frames=1) -> str``: the name of a task's condition given that many
  frames (``name`` for one; ``<name>.<n>`` for ``n > 1`` frames of a ``frames="first"`` row, frame prediction): the
  token shards hold its codes under ``cond.<condition name>``, an interior model's ``condition_regions`` its region;
  :func:`carried_cond_frames` ``(keys, name) -> tuple[int, ...]``: the given-frame counts whose condition codes of
  ``name`` the keys (of a batch, a shard) hold; :func:`carries` ``(keys, row) -> bool``: whether they hold a
  condition of ``row`` (always for rows without one).
- :func:`cli_names` ``() -> tuple[str, ...]`` (generate's ``--task`` choices, in table order),
  :func:`cli_regions` ``(cli_name) -> tuple[str, ...]`` (its ``--region`` choices; empty when it has one row) and
  :func:`from_cli` ``(cli_name, region=None) -> Task``.

The condition region and video of a task are built by ``magvit.conditions.condition_region`` /
``build_condition_video``, which read the row.
"""

from __future__ import annotations

import dataclasses

CONDITIONS = ("video", "sketch", "class", "none")
FRAMES = ("first", "ends", "all")
AREAS = ("all", "central", "vertical", "horizontal", "outside_central")
FILLS = ("nearest_frame", "linear_blend", "edge", "constant")
_FRAME_FILLS = ("nearest_frame", "linear_blend")  # whole frames from the known frames: need area "all"


@dataclasses.dataclass(frozen=True)
class Task:
    """One COMMIT task (see the module docstring for the meaning of each field)."""

    name: str
    cli_name: str
    condition: str  # one of CONDITIONS
    region: str | None = None  # generate's --region value, for a cli_name shared by several rows
    frames: str | None = None  # one of FRAMES ("video" tasks only)
    area: str | None = None  # one of AREAS ("video" tasks only)
    fill: str | None = None  # one of FILLS ("video" tasks only)

    def __post_init__(self) -> None:
        if self.condition not in CONDITIONS:
            raise ValueError(f"task {self.name}: condition must be one of {CONDITIONS}, got {self.condition!r}")
        pixel = (self.frames, self.area, self.fill)
        if self.condition == "video":
            for value, kinds in zip(pixel, (FRAMES, AREAS, FILLS)):
                if value not in kinds:
                    raise ValueError(f"task {self.name}: expected one of {kinds}, got {value!r}")
            if self.fill in _FRAME_FILLS and self.area != "all":
                raise ValueError(f"task {self.name}: fill {self.fill!r} builds whole frames, it needs area 'all'")
            if self.fill == "edge" and (self.frames != "all" or self.area == "outside_central"):
                raise ValueError(f"task {self.name}: fill 'edge' pads a known box of every frame, it needs frames "
                                 "'all' and an area other than 'outside_central'")
        elif pixel != (None, None, None):
            raise ValueError(f"task {self.name}: frames / area / fill belong to 'video' tasks only")

    @property
    def shard_key(self) -> str | None:
        """The token-shard key of the task's condition codes (``None``: it has none, the prefix is all pad)."""
        return {"video": f"cond.{self.name}", "sketch": "sketch_codes"}.get(self.condition)

    @property
    def has_condition_codes(self) -> bool:
        """Whether the task is conditioned on codes (a condition video's or a sketch's): the prefix of a prefix
        model, the condition region's slots of an interior one."""
        return self.shard_key is not None

    @property
    def needs_label(self) -> bool:
        return self.condition == "class"

    @property
    def uses_label(self) -> bool:
        return self.condition != "none"


#: Every task, in the order of the models' default task list.
TASKS: tuple[Task, ...] = (
    Task("frame_prediction", "frame_prediction", "video", frames="first", area="all", fill="nearest_frame"),
    Task("interpolation", "interpolation", "video", frames="ends", area="all", fill="linear_blend"),
    Task("outpaint_central", "outpaint", "video", region="central", frames="all", area="central", fill="edge"),
    Task("outpaint_vertical", "outpaint", "video", region="vertical", frames="all", area="vertical", fill="edge"),
    Task("outpaint_horizontal", "outpaint", "video", region="horizontal", frames="all", area="horizontal",
         fill="edge"),
    Task("inpaint_central", "inpaint", "video", region="central", frames="all", area="outside_central",
         fill="constant"),
    Task("sketch", "sketch", "sketch"),
    Task("class", "class", "class"),
    Task("unconditional", "unconditional", "none"),
)

#: The task list of every model whose config.json names none (all exports written before the list was saved).
#: Frozen: these ids are in saved weights. New tasks are new rows of TASKS, never entries here.
DEFAULT_TASKS: tuple[str, ...] = (
    "frame_prediction", "interpolation", "outpaint_central", "outpaint_vertical", "outpaint_horizontal",
    "inpaint_central", "sketch", "class", "unconditional",
)

TASK_NAMES: tuple[str, ...] = tuple(t.name for t in TASKS)
CONDITION_TASKS: tuple[str, ...] = tuple(t.name for t in TASKS if t.condition == "video")


def task(name: str) -> Task:
    """The row of task ``name``."""
    for row in TASKS:
        if row.name == name:
            return row
    raise ValueError(f"unknown task '{name}'; expected one of {', '.join(t.name for t in TASKS)}")


def condition_name(name: str, num_cond_frames: int = 1) -> str:
    """The name of task ``name``'s condition given ``num_cond_frames`` frames (module docstring): the task's own for
    one, ``<name>.<n>`` for ``n > 1`` given frames of a ``frames="first"`` row."""
    row = task(name)
    if num_cond_frames == 1:
        return name
    if row.frames != "first" or num_cond_frames < 1:
        raise ValueError(f"task '{name}' has no condition of {num_cond_frames} given frames")
    return f"{name}.{num_cond_frames}"


def carried_cond_frames(keys, name: str) -> tuple[int, ...]:
    """The sorted given-frame counts whose condition codes of task ``name`` (``cond.<name>`` for one frame,
    ``cond.<name>.<n>``) are among ``keys``."""
    base = f"cond.{name}"
    counts = {1 for key in keys if key == base}
    counts |= {int(key[len(base) + 1:]) for key in keys
               if key.startswith(base + ".") and key[len(base) + 1:].isdigit()}
    return tuple(sorted(counts))


def carries(keys, row: Task) -> bool:
    """Whether ``keys`` hold a condition of ``row`` (of any given-frame count); rows without one need none."""
    return row.shard_key is None or row.shard_key in keys or bool(row.frames == "first"
                                                                 and carried_cond_frames(keys, row.name))


def cli_names() -> tuple[str, ...]:
    """``python -m magvit.generate --task`` choices, in table order."""
    return tuple(dict.fromkeys(t.cli_name for t in TASKS))


def cli_regions(cli_name: str) -> tuple[str, ...]:
    """``--region`` choices of ``cli_name`` (empty when one row has that name: its region needs no choosing)."""
    rows = [t for t in TASKS if t.cli_name == cli_name]
    return tuple(t.region for t in rows if t.region is not None) if len(rows) > 1 else ()


def from_cli(cli_name: str, region: str | None = None) -> Task:
    """The row of ``--task cli_name --region region``; ``region`` is ignored when one row has ``cli_name``."""
    rows = [t for t in TASKS if t.cli_name == cli_name]
    if not rows:
        raise ValueError(f"unknown task '{cli_name}'; expected one of {', '.join(cli_names())}")
    if len(rows) == 1:
        return rows[0]
    for row in rows:
        if row.region == region:
            return row
    raise ValueError(f"--region of {cli_name} must be one of {', '.join(cli_regions(cli_name))}, got '{region}'")
