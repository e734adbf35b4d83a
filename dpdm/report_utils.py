"""Image grids for reports and `dpdm sample --grid` (matplotlib, Agg), checks of output paths, and how an
epsilon is shown."""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from accounting.plan import bound_text, written_folder

# The formats `save_grid` writes (matplotlib's Agg and vector backends, Pillow for JPEG).
GRID_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")
# What `save_grid` writes into every grid (a PNG text chunk, the PDF's and SVG's creator, a JPEG comment), so
# that `dpdm sample --grid` replaces a grid it wrote and no other file.
GRID_MARK = "dpdm.grid/1"
_GRID_MAX_BYTES = 256 << 20
_GRID_MARK_SPAN = 64 << 10   # bytes read at each end of an existing grid to find GRID_MARK
# A grid of `dpdm sample` names its model after the mark (`grid_mark`): "dpdm.grid/1 plan=sha256:HEX private=yes",
# which `dpdm sample --grid` compares as it compares a samples file's meta_plan_digest and meta_private (N1, stop 55).
_GRID_IDENTITY = re.compile(re.escape(GRID_MARK).encode() + rb" plan=(sha256:[0-9a-f]{64}) private=(yes|no)")


def epsilon_text(epsilon: float, digits: int = 4, *, bound: str = "upper") -> str:
    """`epsilon` to `digits` significant digits, rounded away from the side it bounds: up for a guarantee
    (an upper bound: a certified 10.0045 shows as 10.01, where ".4g" showed 10), down for an audit's lower
    bound. Infinity and NaN as Python writes them (`accounting.plan.bound_text`, which the accountants' own
    messages use)."""
    return bound_text(epsilon, digits, bound=bound)


def grid_suffix_problem(path: str | os.PathLike) -> str | None:
    """Why `save_grid` cannot write `path` (its suffix names no format it writes), or None."""
    if Path(path).suffix.lower() in GRID_SUFFIXES:
        return None
    return f"must end in {', '.join(GRID_SUFFIXES[:-1])} or {GRID_SUFFIXES[-1]}"


def output_parent_problem(path: str | os.PathLike) -> str | None:
    """Why the folder of an output file can neither be used nor created, or the file be named there (None when it
    can): the nearest existing ancestor must be a folder this process may write into (a probe file is made there and
    removed at once), and no name to be made below it may be longer than its file system takes (NAME_MAX: a name of
    256 bytes failed only at the final rename, after `dpdm sample` had drawn every image). Creates nothing.
    A file on the way to the folder, as the OS follows the path's spelling, is no folder either: os.path.abspath
    removes `data.npz/..` by spelling, which the OS refuses (ENOTDIR, after `dpdm sample` had drawn every image:
    h131 F2, stop 53). The folder probed is the one the OS reaches (`output_folder`: `LINK/..` is the parent of
    LINK's target), and a path whose last part is a folder's (`x/..`) names no file (r1 F4, stop 53)."""
    problem = file_name_problem(path) or through_a_file_problem(path) or path_length_problem(path)
    if problem:
        return problem
    target = Path(output_target(path))
    parent = target.parent
    probe = parent
    while not os.path.exists(probe):   # False, not ENAMETOOLONG, for a name too long to look up
        if os.path.islink(probe):
            return f"its folder {str(parent)!r} cannot be created ({str(probe)!r} is a broken link)"
        probe = probe.parent
    if not probe.is_dir():
        if probe == parent:
            return f"{str(parent)!r} is not a folder"
        return f"its folder {str(parent)!r} cannot be created ({str(probe)!r} is not a folder)"
    if not os.access(probe, os.W_OK | os.X_OK):
        if probe == parent:
            return f"its folder {str(parent)!r} is not writable"
        return f"its folder {str(parent)!r} cannot be created ({str(probe)!r} is not writable)"
    # os.access answers yes to root everywhere, and a folder such as /proc refuses new files whatever the
    # mode bits say: a file made and removed at once finds that out before any work.
    try:
        fd, tmp = tempfile.mkstemp(prefix=".dpdm-write-test-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        if probe == parent:
            return f"its folder {str(parent)!r} is not writable ({e.strerror or e})"
        return f"its folder {str(parent)!r} cannot be created ({str(probe)!r} takes no new files: {e.strerror or e})"
    return None


def path_length_problem(path: str | os.PathLike, *, room: int | None = None) -> str | None:
    """Why the file system cannot take the file `path` (as the OS reaches it, `output_target`) by its length, or
    None: a name to be made below its nearest existing folder longer than that folder's file system takes
    (NAME_MAX: a name of 256 bytes failed only at the final rename, after `dpdm sample` had drawn every image:
    h89 F1, stop 47), or the whole path, with `room` bytes more for what the write puts there (the temporary file
    beside it, `_TEMP_ROOM`, by default), at or past the longest path the system takes (PATH_MAX, 4096 bytes on
    Linux with its NUL): 25 legal names of 200 bytes passed, `dpdm sample` drew every image, then ended in
    "File name too long", exit 4 (s56 outwalk F2). Looks nothing up that the OS would refuse by its length (an
    `exists()` of such a path raised ENAMETOOLONG: the demo's and the audit's --out), creates nothing, and names
    the byte counts, not the path (the caller's line names the option's value)."""
    target = Path(output_target(path))
    probe = _existing_ancestor(target.parent) or Path(target.anchor or os.sep)
    limit = name_max(probe)
    for part in target.relative_to(probe).parts:   # the names this write makes
        if len(os.fsencode(part)) > limit:
            return (f"the name {part[:24]!r}... is {len(os.fsencode(part))} bytes long, more than the {limit} "
                    f"that {_short(probe)!r} takes; choose a shorter one")
    size, room = len(os.fsencode(str(target))), _TEMP_ROOM if room is None else room
    longest = path_max(probe)
    if size + room >= longest:   # a path the OS takes is shorter than PATH_MAX, which counts its NUL
        return (f"the path is {size:,} bytes long ({_short(target)!r}), more than the {longest - room - 1:,} a "
                f"file written there may take (the system's PATH_MAX, {longest:,} bytes, less room for a temporary "
                "file's name); choose a shorter one")
    return None


def _short(path: str | os.PathLike, keep: int = 60) -> str:
    """`path` as text, cut to its first `keep` characters and "..." where longer: a path of 5,000 bytes in full made
    a line no terminal shows whole."""
    text = os.fspath(path)
    return text if len(text) <= keep else f"{text[:keep]}..."


def _existing_ancestor(folder: Path) -> Path | None:
    """The nearest of `folder` and its ancestors that exists (a link followed), or None where none does (a root
    cannot be read). `os.path.exists` answers False, never ENAMETOOLONG, for a path too long to look up."""
    probe = folder
    while not os.path.exists(probe):
        if probe == probe.parent:
            return None
        probe = probe.parent
    return probe


def path_max(folder: str | os.PathLike) -> int:
    """The longest path, in bytes with its NUL, that the system takes for a file in `folder` (which exists):
    os.pathconf's PATH_MAX, or Linux's 4096 where it cannot say."""
    try:
        return int(os.pathconf(folder, "PC_PATH_MAX"))
    except (OSError, ValueError, AttributeError):
        return 4096


def through_a_file_problem(path: str | os.PathLike) -> str | None:
    """Why the folder of `path`, followed as the OS follows it (links and ".." in order, not removed by spelling),
    cannot be reached, or None: an existing entry before a later part of the folder's path that is not a folder,
    where a ".." follows (`data.npz/..`, `data.npz/x/../..`), or a part that does not exist before a later "..":
    the OS follows ".." only out of a folder that exists, and `new/../p.json` passed the check, then failed after
    `dpdm plan`'s calibration (where `dpdm sample` made an empty `new/` to get there: r1 F4, stop 53). Torch-free,
    for `dpdm plan`'s checks too."""
    folder = os.path.dirname(os.path.expanduser(os.fspath(path)))
    parts = Path(folder).parts
    if os.pardir not in parts:   # no ".." to remove: os.path.abspath reads the path as the OS does
        return None
    for i in range(len(parts) - 1):   # the last part is the folder itself: `output_parent_problem` checks it
        prefix = os.path.join(*parts[: i + 1])
        if not os.path.exists(prefix):   # missing: made by the write, where no ".." follows it
            if os.pardir not in parts[i + 1:]:
                return None
            return (f"its folder {folder!r} cannot be reached ({prefix!r} does not exist, and the OS follows '..' "
                    "only out of a folder that does): give the path without '..'")
        if not os.path.isdir(prefix):
            return f"its folder {folder!r} cannot be reached ({prefix!r} is not a folder)"
    return None


def file_name_problem(path: str | os.PathLike) -> str | None:
    """Why `path` names no file (its last part is ".", ".." or empty: a folder), or None. `dpdm export --out
    data.npz/..` gave a traceback, and `--out new/..` made `new/`, then failed (r1 F4, stop 53)."""
    name = os.path.basename(os.fspath(path))
    if name in ("", os.curdir, os.pardir):
        ends = f"its last part is {name!r}" if name else "it ends in '/'"
        return f"names a folder ({ends}), not a file: end the path in the file's name"
    return None


def output_folder(path: str | os.PathLike) -> str:
    """The folder, absolute, that a file written at `path` ('~' expanded) lands in, as the OS reaches it. Where the
    folder's spelling holds a "..", os.path.realpath: the OS follows a link before the ".." after it, and
    os.path.abspath removed `LINK/..` by spelling, so a check (and the temporary file of a write) went to the folder
    holding LINK while the file went to the parent of LINK's target (across file systems: EXDEV after the work;
    r1 F4, stop 53). Without "..", os.path.abspath: the same folder, named as the user named it. A ".." after a
    part that does not exist is refused first (`through_a_file_problem`)."""
    return written_folder(os.path.expanduser(os.fspath(path)))


def output_target(path: str | os.PathLike) -> str:
    """The file a write at `path` makes, as the OS reaches it: `output_folder(path)` and `path`'s own name (a link
    or not: `os.replace` replaces a link). The atomic writers (`accounting.plan.atomic_write_text`,
    `checkpoint.atomic_torch_save`) write there (`accounting.plan.written_folder`)."""
    return os.path.join(output_folder(path), os.path.basename(os.path.expanduser(os.fspath(path))))


# The most a temporary file's name adds to its target's (`temp_name_prefix`): ".{pid}.{token}.tmp.npz" (`temp_path`,
# 28 characters at most) or mkstemp's ".XXXXXXXX.tmp" (`checkpoint.atomic_torch_save`).
_TEMP_ROOM = 32


def name_max(folder: str | os.PathLike) -> int:
    """The longest file name, in bytes, that the file system of `folder` (or of its nearest existing ancestor)
    takes: os.pathconf's NAME_MAX, or Linux's 255 where it cannot say."""
    folder = Path(os.path.abspath(folder))
    while not os.path.isdir(folder) and folder != folder.parent:
        folder = folder.parent
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def temp_name_prefix(path: str | os.PathLike) -> str:
    """The start of the names of the temporary files written beside `path` before they are renamed onto it: "."
    and its name, cut to leave `_TEMP_ROOM` characters within NAME_MAX. The name in full took a legal name of 242
    to 255 characters past NAME_MAX (ENAMETOOLONG after `dpdm sample` had drawn every image); the pid and a
    random token that follow keep a cut one unique."""
    path = Path(path)
    prefix, limit = f".{path.name}", name_max(path.parent) - _TEMP_ROOM
    while len(os.fsencode(prefix)) > limit:   # whole characters: a cut UTF-8 sequence is no name to show
        prefix = prefix[:-1]
    return prefix


def temp_path(path: str | os.PathLike, suffix: str = ".tmp") -> Path:
    """A new temporary file name beside `path` (`temp_name_prefix`, the pid, a random token, then `suffix`), for a
    write that is renamed onto `path` once complete."""
    path = Path(path)
    return path.with_name(f"{temp_name_prefix(path)}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")


# A temporary file of an output write (`temp_path`: the pid and a random token after the prefix) that is this old is
# a leftover of a write killed midway, removed by the next write of that output (`remove_temp_leftovers`): one in
# flight is renamed within seconds of its last byte, as `dpdm eval`'s cache entries.
STALE_TEMP_SECONDS = 3600
TEMP_PATH_REST = r"\.\d+\.[0-9a-f]{8}"   # what `temp_path` puts between the prefix and the suffix


def remove_temp_leftovers(path: str | os.PathLike, rest: str) -> None:
    """Removes the temporary files beside `path` of earlier writes of it killed between their write and their
    rename: regular files whose name is `temp_name_prefix(path)` followed by what the regular expression `rest`
    matches, last modified over `STALE_TEMP_SECONDS` ago (one in flight is another process's write). A killed
    `dpdm sample` left a copy of every image (mode 0644 before stop 51), `dpdm export` a full release, `dpdm plan
    --curve` a plot, that no later command removed (h111 N1). Best effort: what cannot be removed stays. Torch-free,
    for `dpdm plan`."""
    path = Path(path)
    name = re.compile(re.escape(temp_name_prefix(path)) + rest)
    for leftover, st in stale_entries(path.parent, name, STALE_TEMP_SECONDS):
        if stat.S_ISREG(st.st_mode):
            with contextlib.suppress(OSError):
                os.unlink(leftover)


# Files `dpdm train` writes into a run folder: config.json (with the fingerprint of the private data), then
# checkpoint.pt (the run's secret seed) beside it and its plan.json. A folder holding a run's config.json, or
# a checkpoint.pt beside a plan.json, is a run folder, whose files no other command may replace or add to (a
# stray checkpoint.pt alone does not make one).
def place_in_dataset(path: str | os.PathLike, dataset: str | None) -> str | None:
    """"is" where `path` (links resolved) is the file or folder of the "npz:PATH" or "folder:PATH" dataset
    `dataset`, "is inside" where it lies in it, else None: outputs written there would read as part of that data
    (`dpdm.sample.check_outputs`; train's run folder, audit's --out, eval's cache and plan's --curve too). Path
    logic only, here rather than in dpdm.sample, so that `dpdm plan` needs no torch for it."""
    data = _dataset_path(dataset)
    target = Path(os.path.realpath(path))
    if data is None or not (target == data or data in target.parents):
        return None
    return "is" if target == data else "is inside"


def _dataset_path(name: str | None) -> Path | None:
    """The file or folder of an "npz:PATH" or "folder:PATH" dataset, links resolved (None for others)."""
    for prefix in ("npz:", "folder:"):
        if isinstance(name, str) and name.startswith(prefix):
            return Path(os.path.realpath(Path(name[len(prefix):]).expanduser()))
    return None


def run_folder_of(folder: str | os.PathLike) -> Path | None:
    """The run folder (`dpdm train --out`) that `folder` is or lies in, links resolved, or None: the
    first of `folder` and its ancestors that holds the config.json of a run, or a checkpoint.pt and a
    plan.json."""
    folder = Path(os.path.realpath(Path(folder).expanduser()))
    for d in (folder, *folder.parents):
        if is_run_config(d / "config.json") or ((d / "checkpoint.pt").is_file() and (d / "plan.json").is_file()):
            return d
    return None


def is_run_config(path: Path) -> bool:
    """Whether `path` is the config.json of a `dpdm train` run (an object with "data_digest" and "train")."""
    try:
        if not path.is_file() or path.stat().st_size > 1 << 20:
            return False
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(doc, dict) and "data_digest" in doc and "train" in doc


def is_dpdm_grid(path: str | os.PathLike) -> bool:
    """Whether `path` is a grid that `save_grid` wrote (it carries `GRID_MARK`)."""
    return any(GRID_MARK.encode() in end for end in _grid_ends(path))


def grid_mark(plan_digest: str, private: bool) -> str:
    """The mark of a grid of samples of the model of a run of `plan_digest` ("sha256:HEX"), private or --no-dp:
    `GRID_MARK` (which `is_dpdm_grid` and a dpdm from before this finds in it) followed by both."""
    return f"{GRID_MARK} plan={plan_digest} private={'yes' if private else 'no'}"


def grid_identity(path: str | os.PathLike) -> tuple[str, bool] | None:
    """The plan digest and private flag the mark of a grid that `save_grid` wrote names (`grid_mark`), or None where
    it names none (a grid from before marks named them, a `dpdm plan --curve` plot) or more than one (made by hand)."""
    found = {(m[1].decode(), m[2] == b"yes") for end in _grid_ends(path) for m in _GRID_IDENTITY.finditer(end)}
    return found.pop() if len(found) == 1 else None


def _grid_ends(path: str | os.PathLike) -> list[bytes]:
    """The first and last `_GRID_MARK_SPAN` bytes of a regular file of at most `_GRID_MAX_BYTES` (a link followed),
    where a grid's mark lies: in the header (PNG, SVG, JPEG) or the trailer (PDF's Info); none for anything else."""
    path = Path(path)
    try:
        if not path.is_file() or path.stat().st_size > _GRID_MAX_BYTES:
            return []
        with open(path, "rb") as f:
            head = f.read(_GRID_MARK_SPAN)
            f.seek(max(0, path.stat().st_size - _GRID_MARK_SPAN))
            return [head, f.read()]
    except OSError:
        return []


# At most this many rows (classes) in a grid: about 46 px a row, so every format can hold it (JPEG stops at
# 65,500 px, about 1,410 rows).
MAX_GRID_ROWS = 100


def save_grid(x: np.ndarray, y: np.ndarray | None, path: str | Path, *, title: str = "", per_row: int = 10,
              staged: bool = False, identity: tuple[str, bool] | None = None) -> Path:
    """Saves uint8 images [N, C, H, W] as a grid with one row per class (or rows of `per_row`); with more than
    `MAX_GRID_ROWS` classes, the first `MAX_GRID_ROWS` classes, and the title says so. Copies only the images it
    shows: `dpdm sample` counts the images once against memory, and a copy of every image of each class doubled
    what `--grid` needed, after all the drawing (h111 F1).

    The format follows the suffix (`GRID_SUFFIXES`) and the file carries `GRID_MARK`; it is written
    atomically (a temporary file in the same folder, fsynced, renamed), readable by its owner only (0600, as
    release files: the images of a --no-dp model are near-copies of private ones), and no temporary file is left
    behind on failure. staged: `save_marked_figure`'s, for a caller that renames the grid itself. identity: the
    plan digest and private flag of the model the images are samples of, which the mark names (`grid_mark`), so that
    `dpdm sample --grid` replaces a grid of another plan's model, or of the other kind, only with --force.

    Raises:
      ValueError: a suffix that names no format in `GRID_SUFFIXES`.
    """
    path = Path(path)
    problem = grid_suffix_problem(path)
    if problem:
        raise ValueError(f"grid path {str(path)!r} {problem}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.asarray(x)
    if y is not None and len(y):
        classes = np.unique(y)
        if len(classes) > MAX_GRID_ROWS:
            note = f"(the first {MAX_GRID_ROWS} of {len(classes)} classes)"
            title = f"{title}\n{note}" if title else note
            classes = classes[:MAX_GRID_ROWS]
        rows = [x[np.flatnonzero(y == c)[:per_row]] for c in classes]   # x[y == c] copied every image
    else:
        rows = [x[i : i + per_row] for i in range(0, min(len(x), per_row * per_row), per_row)]
    rows = [r for r in rows if len(r)]
    c, h, w = x.shape[1:]
    canvas = np.full((len(rows) * (h + 2), per_row * (w + 2), c), 255, dtype=np.uint8)
    for i, r in enumerate(rows):
        for j, img in enumerate(r):
            canvas[i * (h + 2) : i * (h + 2) + h, j * (w + 2) : j * (w + 2) + w] = img.transpose(1, 2, 0)
    fig, ax = plt.subplots(figsize=(per_row * 0.6 + 0.5, len(rows) * 0.6 + 0.8))
    try:
        ax.imshow(canvas.squeeze(-1) if c == 1 else canvas, cmap="gray" if c == 1 else None, vmin=0, vmax=255)
        ax.axis("off")
        if title:
            ax.set_title(title, fontsize=9)
        path.parent.mkdir(parents=True, exist_ok=True)
        return save_marked_figure(fig, path, mode=0o600, staged=staged, dpi=100, bbox_inches="tight",
                                  mark=GRID_MARK if identity is None else grid_mark(*identity))
    finally:
        plt.close(fig)


def save_marked_figure(fig, path: str | os.PathLike, *, mode: int = 0o666, staged: bool = False,
                       mark: str = GRID_MARK, **savefig_kwargs) -> Path:
    """`fig.savefig` into `path` atomically and durably (a temporary file in the same folder, fsynced, renamed; none
    left behind on failure), carrying `GRID_MARK` where the format holds one (png, pdf, svg, jpg): the mark by which
    `dpdm sample --grid` and `dpdm plan --curve` replace only a file they wrote. Returns `path`.

    mode: the file's mode, less the umask (`dpdm sample`'s grids: 0600).
    mark: `GRID_MARK`, or what begins with it (`grid_mark`: a grid of samples names its model).
    staged: leave the fsynced temporary file unrenamed and return it: the caller renames it onto `path` (and
      removes it where it does not), as `dpdm sample` does after renaming its samples file."""
    from accounting.plan import fsync_folder

    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if not mark.startswith(GRID_MARK):
        raise ValueError(f"mark {mark!r} does not begin with {GRID_MARK!r}")
    mark = ({"pil_kwargs": {"comment": mark}} if fmt in ("jpg", "jpeg") else
            {"metadata": {"Software" if fmt == "png" else "Creator": mark}} if fmt in ("png", "pdf", "svg")
            else {})
    tmp = temp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)   # its mode from the start
        try:
            # `mode` less the umask. A umask that clears the owner's write bit (0277) made the file read-only, and
            # savefig's own open of it by name was refused (EACCES, after `dpdm sample` had drawn every image): its
            # owner may write it until its bytes are on disk, then it takes that mode.
            final = stat.S_IMODE(os.fstat(fd).st_mode)
            if not final & stat.S_IWUSR:
                os.fchmod(fd, final | stat.S_IWUSR)
            fig.savefig(tmp, format=fmt, **mark, **savefig_kwargs)
            if not final & stat.S_IWUSR:
                os.fchmod(fd, final)
            # Its bytes on disk before the rename, as a checkpoint's: a power loss after an unsynced rename can leave
            # an empty file where the old one was (on a file system without ext4's replace-on-rename heuristic).
            os.fsync(fd)
        finally:
            os.close(fd)
        if not staged:
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if staged:
        return tmp
    fsync_folder(path.parent)
    return path


def stale_entries(folder: str | os.PathLike, name: re.Pattern[str],
                  max_age: float) -> Iterator[tuple[str, os.stat_result]]:
    """The paths (with their `lstat`) of the entries of `folder` whose whole name matches `name` and that were last
    modified over `max_age` seconds ago: the leftovers of writes killed midway (the eval cache's temporary files,
    an audit's staging folders), which the caller removes as their kind allows. Best effort: an entry that cannot
    be read, or a folder that cannot be listed, yields nothing."""
    now = time.time()
    try:
        entries = [entry for entry in os.scandir(folder) if name.fullmatch(entry.name)]
    except OSError:
        return
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if now - st.st_mtime > max_age:
            yield entry.path, st
