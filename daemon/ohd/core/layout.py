"""Every name ohd gives or reads on disk, in one place: a repo's and the daemon's own folders.

In a repo: `tasks.d/` (task files `*.yaml`/`*.yml`; ingested ones move to `tasks.d/.done/`,
bad ones to `tasks.d/.rejected/` with `<name>.error.txt`; `ohd init`'s examples in
`tasks.d/examples/`), a target's reports in `<its dir>/.ohd/` (a review's default output in
`.ohd/reviews/`), a result that would overwrite the user's edit as `<output>.ohd-new`, the
ladder's transient `test_ohd_candidate_*.py`. In the git dir: the hooks' spool
`<git common dir>/ohd/inbox/` (`*.event`, bad ones in `rejected/`) and a user's own hook moved
aside as `<hook>.ohd-chained`. In the state dir `ohd.db`, `ohd.lock` and the web listener's
`web.token`, in the runtime dir `ohd.sock`; `ohd metrics --textfile DIR` writes `DIR/ohd.prom`.
The hook scripts (`githooks/`) are shell and spell the spool's names themselves.

No other module spells these names, and the hooks spell them alike (tests/core/test_layout.py checks
both): a name changes here or nowhere. Pure and a leaf: it imports nothing of ohd, so every
layer may import it, `config` too (see the contracts in pyproject.toml).
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path, PurePosixPath

TYPE_CHECKING = False   # not `typing`'s: importing typing costs `ohd status` more than this module (issue 17)
if TYPE_CHECKING:
    from typing import Final

# -- a repo's working tree -----------------------------------------------------------------

GIT_DIR: Final = ".git"                # ohd never reads or writes in one, at any depth
TASKS_DIR: Final = "tasks.d"           # the task files ingest reads; ohd writes nothing there
DONE_DIR: Final = ".done"              # in tasks.d/: the files ingested
REJECTED_DIR: Final = ".rejected"      # in tasks.d/: the files refused, each with its error file
EXAMPLES_DIR: Final = "examples"       # in tasks.d/: `ohd init`'s example task files (never read)
# the examples `ohd init` writes there (copies of the package's `examples/`); the first is named in its advice
EXAMPLE_TASKS: Final = ("unit-test.yaml", "docstring.yaml", "review.yaml", "custom.yaml")
TASK_SUFFIXES: Final = frozenset({".yaml", ".yml"})   # a task file's name ends so (any case)
# not ohd's names: an editor's copy beside a task file, and vim's probe of a folder
_EDITOR_TEMP_SUFFIXES: Final = ("~", ".swp", ".swx", ".tmp")
_EDITOR_TEMP_NAMES: Final = frozenset({"4913"})
ERROR_SUFFIX: Final = ".error.txt"     # `<refused file>.error.txt` says why (tasks.d/ and the spool)
REPORT_DIR: Final = ".ohd"             # `<a target's dir>/.ohd/`: its reports
REVIEWS_DIR: Final = "reviews"         # in .ohd/: a review's default output, `<name>.md`
OHD_NEW_SUFFIX: Final = ".ohd-new"     # `<output>.ohd-new`: a result that would overwrite the user's file
CANDIDATE_PREFIX: Final = "test_ohd_candidate_"   # the ladder's transient copy of a generated test
CANDIDATE_NAME: Final = re.compile(re.escape(CANDIDATE_PREFIX) + r"[0-9a-f]{10}_[0-9a-f]{6}\.py")
VENV_DIRS: Final = (".venv", "venv")   # a repo's virtualenv, where `test_python = "auto"` looks first
PYCACHE_DIR: Final = "__pycache__"
NODE_MODULES_DIR: Final = "node_modules"
# what the working-tree watch never looks into (tasks.d/ has its own watch)
TREE_SKIPPED_DIRS: Final = frozenset({GIT_DIR, REPORT_DIR, *VENV_DIRS, PYCACHE_DIR})
# what the search for a killed daemon's leftovers never walks into
LEFTOVERS_SKIPPED_DIRS: Final = frozenset({GIT_DIR, *VENV_DIRS, NODE_MODULES_DIR, PYCACHE_DIR, TASKS_DIR})
# `ohd init` adds these to `.git/info/exclude`
GIT_EXCLUDES: Final = (f"{REPORT_DIR}/", f"{TASKS_DIR}/{DONE_DIR}/", f"{TASKS_DIR}/{REJECTED_DIR}/",
                       f"*{OHD_NEW_SUFFIX}")

# -- the git dir ---------------------------------------------------------------------------

SPOOL_PARTS: Final = ("ohd", "inbox")  # the hooks' spool, under the git common dir
SPOOL_REJECTED_DIR: Final = "rejected"   # in the spool: the events that did not parse
EVENT_SUFFIX: Final = ".event"         # a finished event file (the hooks' temp files are dotfiles)
CHAINED_SUFFIX: Final = ".ohd-chained"   # `<hook>.ohd-chained`: the user's own hook, run first by ours

# -- the daemon's state and runtime dirs ---------------------------------------------------

DATABASE_NAME: Final = "ohd.db"        # in the state dir: the SQLite store (when no database_url)
LOCK_NAME: Final = "ohd.lock"          # in the state dir: one daemon per state dir
SOCKET_NAME: Final = "ohd.sock"        # in the runtime dir: the API socket
WEB_TOKEN_NAME: Final = "web.token"    # in the state dir: the web listener's token (0600)
TEXTFILE_NAME: Final = "ohd.prom"      # `ohd metrics --textfile DIR` writes DIR/ohd.prom (node_exporter's)
WORKTREES_DIR: Final = "worktrees"     # in the state dir: one git worktree per agent run, and its files
AGENT_RUN_PREFIX: Final = "task-"      # `task-<id>-<attempt>`: an agent run's worktree (and its files' stem)
PROMPT_SUFFIX: Final = ".prompt.md"    # `<run>.prompt.md` beside the worktree: what the agent is asked
STDOUT_SUFFIX: Final = ".stdout"       # `<run>.stdout`, `<run>.stderr`: the agent's output while it runs
STDERR_SUFFIX: Final = ".stderr"

# -- an agent runner's result in the repo ----------------------------------------------------

PATCH_SUFFIX: Final = ".patch"          # `.ohd/task-<id>.patch` at the repo root: an agent's diff
BRANCH_PREFIX: Final = "ohd/task-"      # `refs/heads/ohd/task-<id>`: an agent's commit, never checked out


def tasks_dir(repo: Path) -> Path:
    """`<repo>/tasks.d`."""
    return repo / TASKS_DIR


def task_relpath(name: str) -> str:
    """The repo-relative path of the task file `name`: `tasks.d/<name>`."""
    return f"{TASKS_DIR}/{name}"


def error_file(refused: Path) -> Path:
    """`<refused>.error.txt`, beside the refused file."""
    return refused.with_name(refused.name + ERROR_SUFFIX)


def ohd_new(path: Path) -> Path:
    """`<path>.ohd-new`: where a result goes instead of over the user's file."""
    return path.with_name(path.name + OHD_NEW_SUFFIX)


def report_dir(directory: Path) -> Path:
    """`<directory>/.ohd`: the reports of the targets in `directory`."""
    return directory / REPORT_DIR


def review_output(directory: str, name: str) -> str:
    """`<directory>/.ohd/reviews/<name>.md` (POSIX, repo-relative): a review's default output."""
    return posixpath.join(directory, REPORT_DIR, REVIEWS_DIR, f"{name}.md")


def chained_hook(hook: Path) -> Path:
    """`<hook>.ohd-chained`: the user's own hook, moved aside."""
    return hook.with_name(hook.name + CHAINED_SUFFIX)


def spool_dir(git_common_dir: Path) -> Path:
    """`<git common dir>/ohd/inbox`: the hooks' spool."""
    return git_common_dir.joinpath(*SPOOL_PARTS)


def database_path(state_dir: Path) -> Path:
    """`<state dir>/ohd.db`."""
    return state_dir / DATABASE_NAME


def lock_path(state_dir: Path) -> Path:
    """`<state dir>/ohd.lock`."""
    return state_dir / LOCK_NAME


def socket_path(runtime_dir: Path) -> Path:
    """`<runtime dir>/ohd.sock`."""
    return runtime_dir / SOCKET_NAME


def web_token_path(state_dir: Path) -> Path:
    """`<state dir>/web.token`: the web listener's token."""
    return state_dir / WEB_TOKEN_NAME


def worktrees_dir(state_dir: Path) -> Path:
    """`<state dir>/worktrees`: the agent runs' worktrees and their files."""
    return state_dir / WORKTREES_DIR


def run_name(task_id: int, attempt: int) -> str:
    """`task-<id>-<attempt>`: an agent run's worktree under `worktrees_dir`."""
    return f"{AGENT_RUN_PREFIX}{task_id}-{attempt}"


def run_file(worktree: Path, suffix: str) -> Path:
    """`<worktree><suffix>` beside the worktree (its prompt, stdout, stderr): never inside it."""
    return worktree.with_name(worktree.name + suffix)


def is_run_file(name: str) -> bool:
    """A name `worktrees_dir` holds for an agent run: its worktree or one of its files."""
    return name.startswith(AGENT_RUN_PREFIX)


def patch_path(task_id: int) -> str:
    """`.ohd/task-<id>.patch` (repo-relative): an agent's diff delivered as a patch."""
    return f"{REPORT_DIR}/{AGENT_RUN_PREFIX}{task_id}{PATCH_SUFFIX}"


def summary_path(task_id: int) -> str:
    """`.ohd/task-<id>.md` (repo-relative): the summary beside the patch."""
    return f"{REPORT_DIR}/{AGENT_RUN_PREFIX}{task_id}.md"


def branch_ref(task_id: int) -> str:
    """`refs/heads/ohd/task-<id>`: the branch an agent's commit is delivered on."""
    return f"refs/heads/{BRANCH_PREFIX}{task_id}"


def is_task_file_name(name: str) -> bool:
    """A task file's name: `*.yaml`/`*.yml` (any case), not a dotfile, not an editor's temp file.
    Ingest, the tasks.d/ watch and the rule re-read all ask this."""
    if not name or name.startswith(".") or name in _EDITOR_TEMP_NAMES:
        return False
    if name.endswith(_EDITOR_TEMP_SUFFIXES) or (name.startswith("#") and name.endswith("#")):
        return False
    return PurePosixPath(name).suffix.lower() in TASK_SUFFIXES

