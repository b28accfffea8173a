"""`fleet.py images`: build (or reuse, by recipe hash) localhost/djm-debian11 and localhost/djm-debian12,
then the fixture images on top of them (localhost/djm-debian11-pg, djm-debian12-pg: PostgreSQL preinstalled;
djm-debian11-app: an app host's packages; scripts/fleetlib/recipe.py)."""

from __future__ import annotations

import fcntl
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from fleetlib.common import (
    FleetError,
    Timer,
    log,
    podman,
    podman_graphroot,
    require_free_disk,
    require_root,
    require_tools,
    run,
)
from fleetlib.recipe import CONTROLLER_CA_BUNDLE, FIXTURES, RECIPES, FixtureRecipe, Recipe, missing_certificates

BUILD_ROOT = Path("/var/tmp/djm-build")  # noqa: S108 - fixed, root-owned build area (debootstrap needs a real disk)
CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "HOME": "/root"}


def controller_ca_bundle() -> bytes:
    path = Path(CONTROLLER_CA_BUNDLE)
    if not path.is_file():
        raise FleetError(f"controller CA bundle {path} is missing: apt-get install ca-certificates")
    return path.read_bytes()


@contextmanager
def build_lock() -> Iterator[None]:
    """One image build at a time on this machine (two `make images` wait for each other)."""
    BUILD_ROOT.mkdir(parents=True, exist_ok=True)
    with open(BUILD_ROOT / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another image build holds {BUILD_ROOT / '.lock'}; waiting for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def image_id(ref: str) -> str | None:
    proc = run(["podman", "image", "inspect", "--format", "{{.Id}}", ref], check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def image_label(ref: str, label: str) -> str:
    return podman("image", "inspect", "--format", f'{{{{index .Labels "{label}"}}}}', ref).strip()


def image_size(ref: str) -> int:
    return int(podman("image", "inspect", "--format", "{{.Size}}", ref).strip() or 0)


def unmount_below(root: Path) -> None:
    """Unmount anything (proc, sys...) still mounted under root, deepest first."""
    prefix = str(root.resolve()) + "/"
    with open("/proc/mounts") as mounts:
        points = [line.split()[1] for line in mounts]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        run(["umount", "-l", point], check=False)


def remove_workdir(workdir: Path) -> None:
    if workdir.exists():
        unmount_below(workdir)
        run(["rm", "-rf", "--one-file-system", str(workdir)])


def write_files(rootfs: Path, files: dict[str, str]) -> None:
    for path, content in files.items():
        target = rootfs / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink():
            target.unlink()
        target.write_text(content)
        target.chmod(0o644)


def debootstrap(recipe: Recipe, rootfs: Path, logfile: Path) -> None:
    argv = [
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(recipe.packages)}",
        recipe.suite,
        str(rootfs),
        recipe.mirror,
    ]
    with open(logfile, "w") as out:
        proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        tail = logfile.read_text().strip().splitlines()[-1:] or ["no output"]
        raise FleetError(f"debootstrap {recipe.suite} failed: {tail[0]} (full log: {logfile})")


def customise(recipe: Recipe, rootfs: Path, ca_bundle: bytes) -> int:
    """Write the recipe's files and the controller CA certificates, run the script in the chroot."""
    image_bundle = (rootfs / CONTROLLER_CA_BUNDLE.lstrip("/")).read_text()
    certs = missing_certificates(ca_bundle.decode(errors="replace"), image_bundle)
    write_files(rootfs, recipe.all_files())
    cert_files = {f"/usr/local/share/ca-certificates/controller-{n}.crt": pem for n, pem in enumerate(certs, 1)}
    write_files(rootfs, cert_files)
    proc = subprocess.run(
        ["chroot", str(rootfs), "/bin/sh", "-c", recipe.script],
        env=CHROOT_ENV,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FleetError(f"customising {recipe.name} in the chroot failed: {tail[0]}")
    rebuilt = (rootfs / CONTROLLER_CA_BUNDLE.lstrip("/")).read_text()
    if missing_certificates(ca_bundle.decode(errors="replace"), rebuilt):
        raise FleetError(f"{recipe.name}: update-ca-certificates did not take the controller certificates")
    return len(certs)


def import_rootfs(recipe: Recipe, rootfs: Path, digest: str) -> None:
    ref = f"{recipe.repo}:{digest[:12]}"
    changes: list[str] = []
    for change in (*recipe.import_changes, f"LABEL djm.recipe={digest}", f"LABEL djm.image={recipe.name}"):
        changes += ["--change", change]
    tar = subprocess.Popen(
        ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", str(rootfs), "-c", "."],
        stdout=subprocess.PIPE,
    )
    imp = subprocess.run(["podman", "import", *changes, "-", ref], stdin=tar.stdout, capture_output=True, text=True, check=False)
    if tar.stdout is not None:
        tar.stdout.close()
    tar_rc = tar.wait()
    if tar_rc != 0 or imp.returncode != 0:
        detail = imp.stderr.strip().splitlines()[-1:] or [f"tar exit code {tar_rc}"]
        raise FleetError(f"podman import of {ref} failed: {detail[0]}")


def remove_stale_tags(recipe: Recipe | FixtureRecipe, digest: str) -> None:
    """Drop this image's older recipe tags (kept if a container still uses them)."""
    out = podman("images", "--format", "{{.Repository}}:{{.Tag}}", recipe.repo)
    for ref in out.split():
        tag = ref.rsplit(":", 1)[-1]
        if tag not in ("latest", digest[:12]):
            run(["podman", "rmi", ref], check=False)


def is_up_to_date(repo: str, ref: str, existing: str | None, digest: str, timer: Timer) -> bool:
    """The image built from this recipe digest exists: make sure :latest points at it and say so."""
    if not existing or image_label(ref, "djm.recipe") != digest:
        return False
    if image_id(f"{repo}:latest") != existing:
        podman("tag", ref, f"{repo}:latest")
    log(f"{repo}: up to date ({digest[:12]}), {image_size(ref) / 1e6:.0f} MB, {timer.elapsed():.1f}s")
    return True


def ensure_image(recipe: Recipe, ca_bundle: bytes, force: bool) -> None:
    timer = Timer()
    digest = recipe.digest(ca_bundle)
    ref = f"{recipe.repo}:{digest[:12]}"
    existing = image_id(ref)
    if not force and is_up_to_date(recipe.repo, ref, existing, digest, timer):
        return
    log(f"{recipe.repo}: building {recipe.suite} ({digest[:12]})")
    workdir = BUILD_ROOT / f"{recipe.name}-{digest[:12]}"
    remove_workdir(workdir)
    workdir.mkdir(parents=True)
    rootfs = workdir / "rootfs"
    logfile = BUILD_ROOT / f"{recipe.name}-debootstrap.log"
    try:
        debootstrap(recipe, rootfs, logfile)
        log(f"  debootstrap done at {timer.elapsed():.0f}s")
        ncerts = customise(recipe, rootfs, ca_bundle)
        log(f"  customised ({ncerts} controller CA certificate(s) added) at {timer.elapsed():.0f}s")
        # --force: importing onto the existing tag moves it; the old image stays for running containers.
        import_rootfs(recipe, rootfs, digest)
        podman("tag", ref, f"{recipe.repo}:latest")
        if existing and existing != image_id(ref):
            run(["podman", "rmi", existing], check=False)  # no --force: kept while a container uses it
    finally:
        remove_workdir(workdir)
    logfile.unlink(missing_ok=True)
    remove_stale_tags(recipe, digest)
    log(f"{recipe.repo}: built {ref} and :latest, {image_size(ref) / 1e6:.0f} MB, in {timer.elapsed():.0f}s")


def ensure_fixture_image(fixture: FixtureRecipe, base_digest: str, force: bool) -> None:
    """localhost/djm-<base>-pg: a container of the base image runs the fixture script, then is committed."""
    timer = Timer()
    digest = fixture.digest(base_digest)
    ref = f"{fixture.repo}:{digest[:12]}"
    existing = image_id(ref)
    if not force and is_up_to_date(fixture.repo, ref, existing, digest, timer):
        return
    base = RECIPES[fixture.base]
    log(f"{fixture.repo}: building on {base.repo}:{base_digest[:12]} ({digest[:12]})")
    builder = f"djm-build-{fixture.name}-{digest[:12]}"
    run(["podman", "rm", "--force", builder], check=False)
    try:
        podman(
            "run",
            "--name",
            builder,
            "--pull=never",
            f"{base.repo}:{base_digest[:12]}",
            "/bin/sh",
            "-c",
            fixture.build_script(),
            timeout=1800,
        )
        changes: list[str] = []
        for change in (*fixture.import_changes, f"LABEL djm.recipe={digest}", f"LABEL djm.image={fixture.name}"):
            changes += ["--change", change]
        podman("commit", "--quiet", *changes, builder, ref, timeout=600)
        podman("tag", ref, f"{fixture.repo}:latest")
        if existing and existing != image_id(ref):
            run(["podman", "rmi", existing], check=False)  # no --force: kept while a container uses it
    finally:
        run(["podman", "rm", "--force", builder], check=False)
    remove_stale_tags(fixture, digest)
    log(f"{fixture.repo}: built {ref} and :latest, {image_size(ref) / 1e6:.0f} MB, in {timer.elapsed():.0f}s")


def build_images(names: Sequence[str], force: bool) -> None:
    require_root()
    require_tools(["podman", "runc", "debootstrap", "tar", "chroot"])
    require_free_disk([BUILD_ROOT, podman_graphroot()])
    ca_bundle = controller_ca_bundle()
    timer = Timer()
    with build_lock():
        for name in names:
            ensure_image(RECIPES[name], ca_bundle, force)
        for fixture in FIXTURES.values():
            if fixture.base in names:
                ensure_fixture_image(fixture, RECIPES[fixture.base].digest(ca_bundle), force)
    log(f"images: done in {timer.elapsed():.1f}s")
