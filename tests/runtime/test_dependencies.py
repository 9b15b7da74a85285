"""Declared dependencies (DESIGN section 4): requirements.in checked, resolved with pip-tools
into a lock with hashes, installed once per lock into a content-addressed read-only
environment, and turned into the import allowlist of user code.

The hermetic tests build tiny wheels by hand into a temporary wheelhouse and point pip at it
only (``PIP_NO_INDEX``, ``PIP_FIND_LINKS``, ``PIP_CONFIG_FILE=/dev/null``; the pip and
pip-compile subprocesses inherit the environment). Nothing here mocks pip or the sandbox.
One test resolves and installs a real package with the machine's own pip configuration.
"""

from __future__ import annotations

import os
import stat
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runtime.core import App, Runtime
from runtime.dependencies import (
    ENV_MARKER,
    DependencyError,
    Environment,
    Pin,
    Progress,
    check_requirements,
    ensure_environment,
    load_environment,
    lock_key,
    parse_lock,
    resolve,
)
from sandbox.errors import DeployRejected
from sandbox.isolation import SandboxSettings
from tests.runtime.conftest import invoke, served
from tests.wheels import build_wheel, only_wheelhouse, point_pip_at, sha256_of

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="workers drop to the sandbox uid only as root")

Messages = list[tuple[str, int | None, int | None]]


# -- the wheelhouse ----------------------------------------------------------------------------


# The declared distribution: its module name differs from its distribution name, it imports
# its own dependency at import time and a submodule of it lazily (unprivileged, in a worker),
# and it reports who imported it and whether it can write into its own files.
TINYMOD = """
    import errno
    import os

    import tinydep

    IMPORT_UID = os.getuid()
    IMPORT_PID = os.getpid()


    def pid():
        return os.getpid()


    def shout(text):
        return tinydep.upper(text) + "!"


    def lazy():
        from tinydep import extra

        return extra.VALUE


    def try_write():
        here = os.path.dirname(os.path.abspath(__file__))
        attempts = {
            "create": lambda: open(os.path.join(here, "scribble.txt"), "w").close(),
            "append": lambda: open(os.path.join(here, "__init__.py"), "a").close(),
            "chmod": lambda: os.chmod(here, 0o777),
            "remove": lambda: os.remove(os.path.join(here, "helpers.py")),
        }
        outcomes = {}
        for what, attempt in attempts.items():
            try:
                attempt()
                outcomes[what] = "done"
            except OSError as exc:
                outcomes[what] = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
        return outcomes
"""


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wheelhouse")
    build_wheel(
        root,
        "tiny-dist",
        "1.0",
        {"tinymod/__init__.py": TINYMOD, "tinymod/helpers.py": "VALUE = 'helpers'\n"},
        requires=["tiny-dep>=1"],
    )
    build_wheel(
        root,
        "tiny-dep",
        "1.0",
        {
            "tinydep/__init__.py": "def upper(text):\n    return text.upper()\n",
            "tinydep/extra.py": "VALUE = 'extra'\n",
        },
    )
    build_wheel(root, "shadow-json", "1.0", {"json/__init__.py": "SHADOWED = True\n"})
    return root


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, wheelhouse: Path) -> Path:
    """pip (and pip-compile) see the test wheelhouse and nothing else."""
    point_pip_at(monkeypatch, wheelhouse)
    return wheelhouse


@pytest.fixture(scope="module")
def lock(wheelhouse: Path) -> str:
    """``tiny-dist`` resolved by pip-compile against the wheelhouse."""
    with only_wheelhouse(wheelhouse):
        return resolve("tiny-dist\n")


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    """A Runtime whose dependency environments live in a temporary directory."""
    root = tmp_path_factory.mktemp("deps-runtime")
    with Runtime(f"sqlite:///{root / 'chatfn.db'}", envs_dir=root / "envs") as runtime:
        yield runtime


@pytest.fixture(scope="module")
def environment(rt: Runtime, wheelhouse: Path, lock: str) -> Environment:
    """The lock's environment, installed into ``rt``'s envs_dir."""
    with only_wheelhouse(wheelhouse):
        return ensure_environment(parse_lock(lock), rt.envs_dir)


# -- projects ----------------------------------------------------------------------------------

_project_count = 0


def write_project(
    parent: Path,
    handler: str,
    *,
    requirements: str | None = None,
    lock: str | None = None,
    init: str | None = None,
) -> Path:
    """A project folder under ``parent`` with a user_started_session.py handler."""
    global _project_count
    _project_count += 1
    root = parent / f"project-{_project_count}"
    root.mkdir()
    (root / "user_started_session.py").write_text(textwrap.dedent(handler))
    if requirements is not None:
        (root / "requirements.in").write_text(requirements)
    if lock is not None:
        (root / "requirements.txt").write_text(lock)
    if init is not None:
        (root / "init.py").write_text(textwrap.dedent(init))
    return root


def recorder() -> tuple[Messages, Progress]:
    messages: Messages = []

    def progress(message: str, done: int | None, total: int | None) -> None:
        messages.append((message, done, total))

    return messages, progress


def installs(messages: Messages) -> list[str]:
    return [m for m, _, _ in messages if m.startswith("installing")]


def env_entries(envs_dir: Path) -> list[str]:
    """The environment directories (and any leftovers) of an envs_dir, lock files aside."""
    return sorted(p.name for p in envs_dir.iterdir() if not p.name.startswith(".lock-"))


IMPORTS_HANDLER = """
    import tinymod

    def handle_event(event, context):
        what = event.session_id
        if what == "use":
            return [tinymod.shout("hi"), tinymod.lazy()]
        if what == "submodule":
            from tinymod import helpers
            return helpers.VALUE
        if what == "transitive":
            import tinydep
            return "imported tinydep"
        if what == "from-transitive":
            from tinydep import upper
            return upper("x")
        if what == "through-attribute":
            return tinymod.tinydep.upper("x")
        if what == "distribution-name":
            import tiny_dist
            return "imported tiny_dist"
        if what == "undeclared":
            import sqlalchemy
            return "imported sqlalchemy"
        if what == "caught":
            try:
                import tinydep
            except ImportError as exc:
                return "ImportError: " + str(exc)
            return "imported tinydep"
        if what == "preloaded":
            return [tinymod.IMPORT_PID, tinymod.pid(), tinymod.IMPORT_UID]
        if what == "write":
            return tinymod.try_write()
        return None
"""


# -- resolution -------------------------------------------------------------------------------


def test_resolve_locks_the_declared_wheel_and_its_dependency_with_hashes(
    lock: str, wheelhouse: Path
) -> None:
    pins = parse_lock(lock)
    assert [(p.name, p.version) for p in pins] == [("tiny-dep", "1.0"), ("tiny-dist", "1.0")]
    wheels = {
        "tiny-dep": wheelhouse / "tiny_dep-1.0-py3-none-any.whl",
        "tiny-dist": wheelhouse / "tiny_dist-1.0-py3-none-any.whl",
    }
    for pin in pins:
        assert pin.hashes == (sha256_of(wheels[pin.name]),)
    assert "--hash=sha256:" in lock
    # Where packages come from is the server's business: no index or find-links lines.
    assert str(wheelhouse) not in lock and "--find-links" not in lock
    assert "--index-url" not in lock


def test_the_lock_names_no_temporary_path(lock: str) -> None:
    # `chatfn lock` writes this file into the user's project: the same requirements.in must
    # give the same text, not a "# via -r /tmp/<random>/requirements.in" line each time.
    assert "chatfn-lock-" not in lock, lock
    assert "# via -r requirements.in" in lock


def test_resolution_uses_only_the_configured_wheelhouse(offline: Path) -> None:
    # ``six`` is on every index and in the machine's mirrors, but not in the wheelhouse:
    # pip-compile honours PIP_NO_INDEX / PIP_FIND_LINKS / PIP_CONFIG_FILE.
    with pytest.raises(DependencyError) as caught:
        resolve("six\n")
    assert "six" in caught.value.message
    assert "\n" not in caught.value.message and "Traceback" not in caught.value.message


def test_resolution_honours_a_pip_configuration_file(
    monkeypatch: pytest.MonkeyPatch, wheelhouse: Path, tmp_path: Path, lock: str
) -> None:
    for name in ("PIP_FIND_LINKS", "PIP_NO_INDEX", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "pip.conf"
    config.write_text(f"[global]\nno-index = true\nfind-links = {wheelhouse}\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(config))
    assert parse_lock(resolve("tiny-dist\n")) == parse_lock(lock)


# -- deploying with dependencies ---------------------------------------------------------------


def test_a_deploy_without_a_lock_is_resolved_on_the_server_and_imported(
    rt: Runtime, offline: Path, tmp_path: Path, lock: str
) -> None:
    app = rt.create_app("server-resolved")
    messages, progress = recorder()
    info = app.deploy(
        write_project(tmp_path, IMPORTS_HANDLER, requirements="tiny-dist\n"), progress=progress
    )
    assert info.status == "active"
    assert served(app, "use") == ["HI!", "extra"]
    assert served(app, "submodule") == "helpers"
    assert any(m.startswith("resolving") for m, _, _ in messages)
    # The lock resolved on the server is stored with the version.
    stored = app.deployments.project(info.version).lock
    assert stored is not None and parse_lock(stored) == parse_lock(lock)
    # ... and installed into the environment of that lock, put on the worker's path.
    env = rt.envs_dir / lock_key(parse_lock(lock))
    assert (env / ENV_MARKER).is_file()
    policy = rt.deployment(app, info.version).policy
    assert str(env) in policy.module_paths
    assert "tinymod" in policy.allowed_modules
    assert not {"tinydep", "tiny_dist", "tiny_dep"} & policy.allowed_modules


@pytest.fixture(scope="module")
def imports_app(
    rt: Runtime, lock: str, environment: Environment, tmp_path_factory: pytest.TempPathFactory
) -> App:
    app = rt.create_app("imports")
    app.deploy(
        write_project(
            tmp_path_factory.mktemp("imports"),
            IMPORTS_HANDLER,
            requirements="tiny-dist\n",
            lock=lock,
        )
    )
    return app


def test_the_declared_distribution_is_allowed_under_its_module_name(imports_app: App) -> None:
    assert served(imports_app, "use") == ["HI!", "extra"]
    assert served(imports_app, "submodule") == "helpers"


@pytest.mark.parametrize(
    ("what", "module"),
    [
        ("transitive", "tinydep"),
        ("from-transitive", "tinydep"),
        ("distribution-name", "tiny_dist"),
        ("undeclared", "sqlalchemy"),
    ],
)
def test_importing_anything_else_fails_naming_the_allowlist(
    imports_app: App, what: str, module: str
) -> None:
    inv = invoke(imports_app, what)
    assert inv.failed and inv.error is not None
    assert inv.error.code == "sandbox_violation", inv.error
    message = inv.error.message
    assert f"import of {module!r} is not allowed" in message
    assert "Allowed modules:" in message and "tinymod" in message and "json" in message
    assert "requirements.in" in message
    # The dependency's own dependency works for the dependency (it was imported above).
    assert served(imports_app, "use") == ["HI!", "extra"]


def test_a_forbidden_import_is_an_import_error_user_code_can_catch(imports_app: App) -> None:
    result = served(imports_app, "caught")
    assert result.startswith("ImportError: import of 'tinydep' is not allowed")
    assert "tinymod" in result and "requirements.in" in result


def test_a_transitive_module_is_not_reachable_through_the_declared_one(imports_app: App) -> None:
    inv = invoke(imports_app, "through-attribute")
    assert inv.failed and inv.error is not None
    assert inv.error.code == "sandbox_violation"
    assert "tinydep" in inv.error.message


def test_the_template_preimports_the_declared_modules(imports_app: App) -> None:
    import_pid, worker_pid, _uid = served(imports_app, "preloaded")
    # Imported once in the template process, before the worker was forked from it.
    assert import_pid != worker_pid
    assert imports_app.runtime.deployment(imports_app, 1).policy.preload == ("tinymod",)


@needs_root
def test_dependency_import_time_code_runs_unprivileged(imports_app: App) -> None:
    _pid, _worker_pid, import_uid = served(imports_app, "preloaded")
    # The app's own uid, from the operator's range.
    assert import_uid == SandboxSettings().uids.for_app(imports_app.id)


def test_the_environment_is_read_only(environment: Environment) -> None:
    modes = {}
    for directory, dirs, files in os.walk(environment.path):
        for name in dirs:
            modes[os.path.join(directory, name)] = 0o555
        for name in files:
            modes[os.path.join(directory, name)] = 0o444
    modes[str(environment.path)] = 0o555
    assert any(path.endswith("tinymod/__init__.py") for path in modes)
    for path, expected in modes.items():
        assert stat.S_IMODE(os.lstat(path).st_mode) == expected, path


@needs_root
def test_a_dependency_cannot_write_into_its_environment(
    imports_app: App, environment: Environment
) -> None:
    outcomes = served(imports_app, "write")
    assert set(outcomes) == {"create", "append", "chmod", "remove"}
    # Refused by the read-only mount (EROFS), or by Landlock and file modes without it.
    assert set(outcomes.values()) <= {"EROFS", "EACCES", "EPERM"}, outcomes
    package = environment.path / "tinymod"
    assert not (package / "scribble.txt").exists()
    assert (package / "helpers.py").is_file()
    assert stat.S_IMODE(package.stat().st_mode) == 0o555


def test_a_second_deploy_of_the_same_lock_installs_nothing(
    rt: Runtime, offline: Path, tmp_path: Path, lock: str, environment: Environment
) -> None:
    before = env_entries(rt.envs_dir)
    marker_mtime = (environment.path / ENV_MARKER).stat().st_mtime_ns
    app = rt.create_app("same-lock")
    messages, progress = recorder()
    app.deploy(
        write_project(tmp_path, IMPORTS_HANDLER, requirements="tiny-dist\n", lock=lock),
        progress=progress,
    )
    assert installs(messages) == [] and not any(m == "verifying" for m, _, _ in messages)
    assert env_entries(rt.envs_dir) == before
    assert (environment.path / ENV_MARKER).stat().st_mtime_ns == marker_mtime
    assert served(app, "use") == ["HI!", "extra"]


def test_two_deploys_of_one_lock_at_once_install_it_once(
    monkeypatch: pytest.MonkeyPatch, wheelhouse: Path, tmp_path: Path, lock: str
) -> None:
    # Through a pip configuration file this time: the machine's pip config is respected.
    for name in ("PIP_FIND_LINKS", "PIP_NO_INDEX", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "pip.conf"
    config.write_text(f"[global]\nno-index = true\nfind-links = {wheelhouse}\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(config))
    envs = tmp_path / "envs"
    barrier = threading.Barrier(2)
    messages: dict[str, Messages] = {}
    outcomes: dict[str, object] = {}
    with Runtime(f"sqlite:///{tmp_path / 'race.db'}", envs_dir=envs) as runtime:
        apps = {name: runtime.create_app(name) for name in ("race-a", "race-b")}
        projects = {
            name: write_project(tmp_path, IMPORTS_HANDLER, requirements="tiny-dist\n", lock=lock)
            for name in apps
        }

        def deploy(name: str) -> None:
            messages[name], progress = recorder()
            barrier.wait()
            try:
                outcomes[name] = apps[name].deploy(projects[name], progress=progress).status
            except Exception as exc:
                outcomes[name] = exc

        threads = [threading.Thread(target=deploy, args=(name,)) for name in apps]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert outcomes == {"race-a": "active", "race-b": "active"}
        assert env_entries(envs) == [lock_key(parse_lock(lock))]  # no staging left behind
        # pip ran once: one "installing N distributions" between the two deploys.
        started = installs(messages["race-a"] + messages["race-b"])
        assert [m for m in started if m.endswith(" distributions")] == [
            "installing 2 distributions"
        ], messages
        for app in apps.values():
            assert served(app, "use") == ["HI!", "extra"]


def test_concurrent_installs_of_one_lock_run_pip_once(
    offline: Path, tmp_path: Path, lock: str
) -> None:
    pins = parse_lock(lock)
    envs = tmp_path / "envs"
    barrier = threading.Barrier(4)
    messages: Messages = []
    results: list[Environment | BaseException] = []

    def progress(message: str, done: int | None, total: int | None) -> None:
        messages.append((message, done, total))

    def install() -> None:
        barrier.wait()
        try:
            results.append(ensure_environment(pins, envs, progress))
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=install) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert all(isinstance(r, Environment) for r in results) and len(results) == 4, results
    assert {r.path for r in results if isinstance(r, Environment)} == {envs / lock_key(pins)}
    assert [m for m in installs(messages) if m.endswith(" distributions")] == [
        "installing 2 distributions"
    ]
    assert env_entries(envs) == [lock_key(pins)]


def test_the_environment_is_verified_against_the_lock(environment: Environment) -> None:
    assert environment.versions == {"tiny-dep": "1.0", "tiny-dist": "1.0"}
    # The modules come from the installed metadata (RECORD), not from the names.
    assert environment.modules == {"tiny-dep": ("tinydep",), "tiny-dist": ("tinymod",)}
    assert environment.modules_of(["Tiny_Dist"]) == ["tinymod"]
    pins = [Pin("tiny-dist", "1.1", ("sha256:" + "0" * 64,))]
    with pytest.raises(DependencyError, match=r"installed at 1\.0, but the lock says 1\.1"):
        load_environment(environment.path, pins)
    with pytest.raises(DependencyError, match="missing"):
        load_environment(environment.path, [Pin("other-dist", "1.0", ("sha256:" + "0" * 64,))])


# -- rejected dependencies --------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_deps_app(rt: Runtime, tmp_path_factory: pytest.TempPathFactory) -> App:
    app = rt.create_app("bad-deps")
    app.deploy(
        write_project(
            tmp_path_factory.mktemp("v1"),
            "def handle_event(event, context):\n    return 'v1'\n",
        )
    )
    return app


def rejected(app: App, project: Path) -> tuple[DeployRejected, dict[str, Any]]:
    """Deploy ``project`` expecting a rejection; the exception and its one stored error.
    The previous version (1) stays active and serving."""
    with pytest.raises(DeployRejected) as caught:
        app.deploy(project)
    failed = app.deployments.list()[0]
    assert failed.version > 1 and failed.status == "failed"
    assert failed.errors == caught.value.errors and len(failed.errors) == 1
    assert app.state().version == 1
    assert served(app) == "v1"
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    return caught.value, failed.errors[0]


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("tiny-dist @ https://example.com/tiny_dist-1.0-py3-none-any.whl", "https://example.com"),
        ("https://example.com/x.whl", "https://example.com/x.whl"),
        ("git+https://example.com/tiny.git", "git+https://example.com/tiny.git"),
        ("./vendor/x.whl", "./vendor/x.whl"),
        ("/abs/path/x.whl", "/abs/path/x.whl"),
        # pip reads a bare archive name as a file in its working directory.
        ("vendor-1.0-py3-none-any.whl", "vendor-1.0-py3-none-any.whl"),
        ("-e .", "-e"),
        ("--index-url https://evil.example/simple", "--index-url"),
        ("-r other.txt", "-r"),
        ("tiny-dist>=>1", "not a valid requirement"),
    ],
)
def test_a_requirement_that_is_not_a_plain_package_is_rejected(
    bad_deps_app: App, offline: Path, tmp_path: Path, line: str, fragment: str
) -> None:
    project = write_project(
        tmp_path,
        "def handle_event(event, context):\n    return 'v2'\n",
        requirements=f"# dependencies\ntiny-dist\n{line}\n",
    )
    exc, error = rejected(bad_deps_app, project)
    assert fragment in str(exc)
    assert "requirements.in:3" in str(exc)
    assert error["file"] == "requirements.in" and error["line"] == 3


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("no-such-package-xyz", "no-such-package-xyz"),
        ("tiny-dist>=99", "tiny-dist>=99"),
    ],
)
def test_a_requirement_that_cannot_be_resolved_is_rejected_naming_it(
    bad_deps_app: App, offline: Path, tmp_path: Path, line: str, fragment: str
) -> None:
    project = write_project(
        tmp_path,
        "def handle_event(event, context):\n    return 'v2'\n",
        requirements=f"# dependencies\ntiny-dep\n{line}\n",
    )
    exc, error = rejected(bad_deps_app, project)
    assert fragment in str(exc) and "requirements.in" in str(exc)
    assert error["file"] == "requirements.in"
    assert error["line"] in (None, 3)


def test_a_stale_lock_is_rejected_naming_chatfn_lock(
    bad_deps_app: App, offline: Path, tmp_path: Path, lock: str
) -> None:
    handler = "def handle_event(event, context):\n    return 'v2'\n"
    exc, error = rejected(
        bad_deps_app, write_project(tmp_path, handler, requirements="tiny-dist>=2\n", lock=lock)
    )
    assert "tiny-dist" in str(exc) and "`chatfn lock`" in str(exc)
    assert error["file"] == "requirements.txt"
    exc, error = rejected(
        bad_deps_app,
        write_project(tmp_path, handler, requirements="tiny-dist\nsomething-else\n", lock=lock),
    )
    assert "something-else" in str(exc) and "`chatfn lock`" in str(exc)


def test_a_lock_without_hashes_is_rejected(
    bad_deps_app: App, offline: Path, tmp_path: Path
) -> None:
    exc, error = rejected(
        bad_deps_app,
        write_project(
            tmp_path,
            "def handle_event(event, context):\n    return 'v2'\n",
            requirements="tiny-dist\n",
            lock="tiny-dep==1.0\ntiny-dist==1.0\n",
        ),
    )
    assert "--hash" in str(exc) and "`chatfn lock`" in str(exc)
    assert error["file"] == "requirements.txt" and error["line"] == 1


def test_a_lock_whose_hash_does_not_match_is_rejected(
    rt: Runtime, bad_deps_app: App, offline: Path, tmp_path: Path, wheelhouse: Path
) -> None:
    wheel = wheelhouse / "tiny_dist-1.0-py3-none-any.whl"
    lock = f"tiny-dep==1.0 --hash=sha256:{'0' * 64}\ntiny-dist==1.0 --hash={sha256_of(wheel)}\n"
    exc, _error = rejected(
        bad_deps_app,
        write_project(
            tmp_path,
            "def handle_event(event, context):\n    return 'v2'\n",
            requirements="tiny-dist\n",
            lock=lock,
        ),
    )
    assert "tiny-dep" in str(exc) and "hash" in str(exc)
    key = lock_key(parse_lock(lock))
    assert not (rt.envs_dir / key).exists()
    assert not [p for p in rt.envs_dir.iterdir() if p.name.startswith(".staging-")]


def test_a_distribution_that_shadows_the_standard_library_is_rejected(
    bad_deps_app: App, offline: Path, tmp_path: Path, wheelhouse: Path
) -> None:
    wheel = wheelhouse / "shadow_json-1.0-py3-none-any.whl"
    exc, error = rejected(
        bad_deps_app,
        write_project(
            tmp_path,
            "import json\n\ndef handle_event(event, context):\n    return 'v2'\n",
            requirements="shadow-json\n",
            lock=f"shadow-json==1.0 --hash={sha256_of(wheel)}\n",
        ),
    )
    assert "'json'" in str(exc) and "standard library" in str(exc)
    assert error["file"] == "requirements.in"


# -- check_requirements and parse_lock ---------------------------------------------------------


def test_check_requirements_accepts_plain_packages() -> None:
    text = (
        "# comment\n"
        "pyjwt>=2.8  # trailing comment\n"
        "\n"
        "firebase-admin[extra1,extra2] ==6.* ; python_version >= '3.8'\n"
        "requests \\\n"
        "    >=2.31\n"
    )
    requirements = check_requirements(text)
    assert [(r.name, str(r.specifier)) for r in requirements] == [
        ("pyjwt", ">=2.8"),
        ("firebase-admin", "==6.*"),
        ("requests", ">=2.31"),
    ]
    assert requirements[1].extras == {"extra1", "extra2"}
    assert requirements[1].marker is not None
    assert check_requirements("") == [] and check_requirements("# nothing\n\n") == []


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("six\npkg @ https://example.com/p.whl\n", 2, "URL or a local path"),
        ("https://example.com/x.whl\n", 1, "URL or a local path"),
        ("six\n\n./vendor/x.whl\n", 3, "URL or a local path"),
        ("/abs/path\n", 1, "URL or a local path"),
        ("six\nvendor-1.0-py3-none-any.whl\n", 2, "local path"),
        ("vendor.tar.gz\n", 1, "local path"),
        ("-e .\n", 1, "options (-e) are not allowed"),
        ("six\n--index-url https://evil.example/simple\n", 2, "options (--index-url)"),
        ("--extra-index-url=https://evil.example/simple\n", 1, "are not allowed"),
        ("six\nsix ==\n", 2, "not a valid requirement"),
        ("tiny dist\n", 1, "not a valid requirement"),
        ("pkg @ file:x.whl\n", 1, "only packages from the package index"),
    ],
)
def test_check_requirements_rejects_anything_else_naming_the_line(
    text: str, line: int, fragment: str
) -> None:
    with pytest.raises(DependencyError) as caught:
        check_requirements(text)
    assert caught.value.file == "requirements.in" and caught.value.line == line
    assert caught.value.message.startswith(f"requirements.in:{line}: ")
    assert fragment in caught.value.message
    assert "\n" not in caught.value.message


HASH_A = "sha256:" + "a" * 64
HASH_B = "sha256:" + "b" * 64


def test_parse_lock_reads_a_pip_compile_lock() -> None:
    text = (
        "#\n# This file is autogenerated by pip-compile\n#\n"
        "--index-url https://pypi.org/simple\n"
        "--find-links /opt/wheels\n"
        "PyJWT==2.8.0 \\\n"
        f"    --hash={HASH_A} \\\n"
        f"    --hash={HASH_B}\n"
        "    # via -r requirements.in\n"
        f"Tiny_Dist[extra]==1.0 --hash={HASH_A}\n"
    )
    assert parse_lock(text) == [
        Pin("pyjwt", "2.8.0", (HASH_A, HASH_B)),
        Pin("tiny-dist", "1.0", (HASH_A,)),
    ]
    assert parse_lock("") == []


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        (f"six>=1 --hash={HASH_A}\n", 1, "is not pinned as name==version"),
        (f"six==1.0 --hash={HASH_A}\ntiny-dist==1.0\n", 2, "tiny-dist has no --hash"),
        ("-e .\n", 1, "option -e is not allowed"),
        (f"https://example.com/x.whl --hash={HASH_A}\n", 1, "not pinned"),
    ],
)
def test_parse_lock_rejects_what_is_not_pinned_with_hashes(
    text: str, line: int, fragment: str
) -> None:
    with pytest.raises(DependencyError) as caught:
        parse_lock(text)
    assert caught.value.file == "requirements.txt" and caught.value.line == line
    assert fragment in caught.value.message


# -- a real package from the registry ----------------------------------------------------------


@pytest.fixture(scope="module")
def registry_runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    root = tmp_path_factory.mktemp("registry")
    with Runtime(f"sqlite:///{root / 'chatfn.db'}", envs_dir=root / "envs") as runtime:
        yield runtime


def test_a_real_package_resolves_installs_and_imports(
    registry_runtime: Runtime, tmp_path: Path
) -> None:
    # The machine's own pip configuration (index, mirrors, find-links): no monkeypatching.
    app = registry_runtime.create_app("registry")
    key = "k" * 40
    app.deploy(
        write_project(
            tmp_path,
            f"""
            import jwt

            def handle_event(event, context):
                token = jwt.encode({{"sub": event.session_id}}, "{key}", algorithm="HS256")
                return jwt.decode(token, "{key}", algorithms=["HS256"])
            """,
            requirements="pyjwt>=2.8\n",
        )
    )
    assert served(app, "alice") == {"sub": "alice"}
    lock = app.deployments.project(1).lock
    assert lock is not None
    pins = parse_lock(lock)
    assert "pyjwt" in [p.name for p in pins] and all(p.hashes for p in pins)
    env = registry_runtime.envs_dir / lock_key(pins)
    assert (env / ENV_MARKER).is_file()
    assert "jwt" in registry_runtime.deployment(app, 1).policy.allowed_modules
