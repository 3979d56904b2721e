"""Verified, atomic installs and rollbacks.

:meth:`Installer.install_bytes` runs the device checks in this order; the first failure
stops the install with a :class:`protocol.BundleError` carrying its ``ReasonCode``, and
nothing on disk or in memory changes:

1. signature by a trusted, non-revoked key      (signature_invalid / key_unknown / key_revoked)
2. every file hash and size                      (hash_mismatch / missing_file)
3. release newer than the active one of the same model name (release_not_newer), unless
   ``allow_older``; a bundle of another model name needs ``replace_model`` (a signed deploy
   field, or ``--replace-model`` on the CLI) (model_name_mismatch), and must then be newer
   than any installed release of its own name
4. not expired, not dated in the future          (expired / not_yet_valid)
5. compatible with the device profile + runtime  (profile_incompatible / runtime_unavailable)
6. the model loads                               (model_load_failed)
7. the smoke tests pass                          (smoke_test_failed)

Only then is the bundle written to a new slot (a full disk → ``disk_full``) and made
active, and ``on_activate(manifest, model_bytes)`` lets the predictor swap. Every step is
reported through ``on_event`` as an :class:`InstallEvent`.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Union

import numpy as np

from protocol.bundle import read_bundle, verify_bundle
from protocol.errors import BundleError, ReasonCode
from protocol.feeds import decode_outputs, make_feeds
from protocol.manifest import Manifest
from protocol.messages import ModelRef
from protocol.profiles import DeviceProfile
from protocol.signing import TrustStore

from .config import AgentConfig
from .errors import ModelError, SlotError
from .events import InstallEvent
from .runtimes import Runtime, open_runtime, runtime_available
from .slots import Slots

log = logging.getLogger("edgefleet.agent.installer")


def model_ref(manifest: Manifest) -> ModelRef:
    sha = manifest.file(manifest.model.path).sha256 if manifest.files else None
    return ModelRef(
        name=manifest.name, version=manifest.version, release=manifest.release, sha256=sha
    )


class Installer:
    def __init__(
        self,
        config: AgentConfig,
        slots: Slots,
        trust: TrustStore,
        profile: DeviceProfile,
        on_event: Callable[[InstallEvent], None] | None = None,
        on_activate: Callable[[Manifest, bytes], None] | None = None,
    ) -> None:
        self.config = config
        self.slots = slots
        self.trust = trust
        self.profile = profile
        self.on_event = on_event
        self.on_activate = on_activate
        self.threads = config.runtime.threads or profile.inference_threads

    @classmethod
    def from_config(cls, config: AgentConfig, **kwargs) -> Installer:  # type: ignore[no-untyped-def]
        slots = Slots(config.data_dir / "slots", config.slots.keep_previous)
        return cls(config, slots, config.trust_store(), config.device_profile(), **kwargs)

    def _emit(
        self,
        state: str,
        detail: str,
        model: ModelRef | None = None,
        reason: str | None = None,
    ) -> None:
        log.info("install %s %s %s", state, reason or "", detail)
        if self.on_event is not None:
            try:
                self.on_event(InstallEvent(state=state, reason=reason, detail=detail, model=model))
            except Exception:  # reporting must not break an install
                log.exception("install event observer failed")

    def active(self) -> Manifest | None:
        slot = self.slots.active_id()
        if slot is None:
            return None
        try:
            return self.slots.load(slot).manifest
        except SlotError:
            loaded = self.slots.load_active()
            return loaded.manifest if loaded else None

    def history(self) -> list[Manifest]:
        """Installed versions, newest install first."""
        out = []
        for slot in reversed(self.slots.order()):
            try:
                out.append(self.slots.load(slot).manifest)
            except SlotError:
                continue
        return out

    # -- install ------------------------------------------------------------------------
    def install_file(
        self,
        path: Union[str, Path],
        *,
        allow_older: bool = False,
        activate: bool = True,
        replace_model: bool = False,
    ) -> Manifest:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise BundleError(
                ReasonCode.ARCHIVE_INVALID, f"cannot read {path}: {exc.strerror}"
            ) from None
        return self.install_bytes(
            data, allow_older=allow_older, activate=activate, replace_model=replace_model
        )

    def installed_releases(self) -> dict[str, int]:
        """The highest installed release of each model name."""
        out: dict[str, int] = {}
        for m in self.history():
            out[m.name] = max(out.get(m.name, 0), m.release)
        return out

    def install_bytes(
        self,
        bundle: bytes,
        *,
        allow_older: bool = False,
        activate: bool = True,
        replace_model: bool = False,
    ) -> Manifest:
        self._emit("verifying", f"{len(bundle)} bytes")
        ref: ModelRef | None = None
        try:
            b = read_bundle(bundle, trust=self.trust)
            active = self.active()
            manifest = verify_bundle(
                b,
                self.trust,
                installed_release=active.release if active else None,
                allow_older=allow_older,
                profile=self.profile,
                active_name=active.name if active else None,
                installed=self.installed_releases(),
                replace_model=replace_model,
            )
            ref = model_ref(manifest)
            if not runtime_available(manifest.model.format):
                raise BundleError(
                    ReasonCode.RUNTIME_UNAVAILABLE,
                    f"no {manifest.model.format} runtime is installed on this device",
                )
            model_bytes = b.members[manifest.model.path]
            try:
                runtime = open_runtime(model_bytes, manifest, self.threads)
            except ModelError as exc:
                raise BundleError(ReasonCode.MODEL_LOAD_FAILED, str(exc)) from None
            self._smoke(runtime, manifest)
            try:
                slot = self.slots.write(bundle, manifest)
                if activate:
                    self.slots.activate(slot)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise BundleError(
                        ReasonCode.DISK_FULL, f"data disk is full: {exc.strerror}"
                    ) from None
                raise BundleError(ReasonCode.INTERNAL, f"cannot write slot: {exc}") from None
        except BundleError as exc:
            state = (
                "failed"
                if exc.reason in (ReasonCode.DISK_FULL, ReasonCode.INTERNAL)
                else "rejected"
            )
            self._emit(state, exc.message, ref, exc.reason.value)
            raise
        if activate and self.on_activate is not None:
            self.on_activate(manifest, model_bytes)
        self._emit(
            "installed", f"{manifest.name} {manifest.version} (release {manifest.release})", ref
        )
        return manifest

    def _smoke(self, runtime: Runtime, manifest: Manifest) -> None:
        if self.config.faults.fail_smoke_test:
            raise BundleError(
                ReasonCode.SMOKE_TEST_FAILED,
                "smoke test failed (fault injected by faults.fail_smoke_test)",
            )
        for n, test in enumerate(manifest.smoke_tests):
            try:
                feeds = make_feeds(np.asarray(test.rows, dtype=object), manifest.input_schema)
                pred = decode_outputs(runtime.run(feeds), manifest.output_schema)
            except (ModelError, ValueError, KeyError, IndexError, TypeError) as exc:
                raise BundleError(
                    ReasonCode.SMOKE_TEST_FAILED, f"smoke test {n} raised: {exc}"
                ) from None
            if test.expected_labels is not None and list(pred.labels or []) != list(
                test.expected_labels
            ):
                raise BundleError(
                    ReasonCode.SMOKE_TEST_FAILED,
                    f"smoke test {n}: labels {pred.labels} != expected {test.expected_labels}",
                )
            for got, want, what in (
                (pred.probabilities, test.expected_probabilities, "probabilities"),
                (pred.values, test.expected_values, "values"),
            ):
                if want is None:
                    continue
                g = np.asarray(got, dtype=np.float64) if got is not None else None
                w = np.asarray(want, dtype=np.float64)
                if g is None or g.shape != w.shape or not np.allclose(g, w, atol=test.atol, rtol=0):
                    diff = (
                        "missing"
                        if g is None or g.shape != w.shape
                        else f"max |Δ| {np.abs(g - w).max():.3g}"
                    )
                    raise BundleError(
                        ReasonCode.SMOKE_TEST_FAILED,
                        f"smoke test {n}: {what} differ beyond atol {test.atol} ({diff})",
                    )

    # -- rollback -----------------------------------------------------------------------
    def rollback_to(self, target: ModelRef) -> Manifest:
        """Switch to the installed slot holding exactly ``target`` (name, version, release,
        model sha256): what a device ran before a rollout. Raises :class:`SlotError` when no
        slot holds it."""
        for slot in reversed(self.slots.order()):
            try:
                loaded = self.slots.load(slot)
            except SlotError:
                continue
            if model_ref(loaded.manifest) == target:
                return self._switch(slot)
        self._emit(
            "failed",
            f"{target.name} {target.version} is not installed",
            target,
            ReasonCode.VERSION_NOT_INSTALLED.value,
        )
        raise SlotError(
            f"{target.name} {target.version} (release {target.release}) is not installed"
        )

    def rollback(self, to_release: int | None = None) -> Manifest:
        """Switch to the previous slot, or to the installed slot with ``to_release``.

        Anti-rollback does not apply: the device (or a signed command) asked for it.
        """
        order = self.slots.order()
        active = self.slots.active_id()
        if to_release is None:
            target = self.slots.previous_id(active)
            if target is None:
                self._emit(
                    "failed", "no previous version to roll back to", None, ReasonCode.INTERNAL.value
                )
                raise SlotError("no previous version is installed to roll back to")
        else:
            matches = [s for s in order if s.startswith(f"r{to_release:08d}-")]
            if not matches:
                self._emit(
                    "failed",
                    f"release {to_release} is not installed",
                    None,
                    ReasonCode.INTERNAL.value,
                )
                raise SlotError(
                    f"release {to_release} is not installed (installed: "
                    f"{', '.join(str(int(s[1:9])) for s in order) or 'none'})"
                )
            target = matches[-1]
        return self._switch(target)

    def _switch(self, target: str) -> Manifest:
        loaded = self.slots.load(target)
        ref = model_ref(loaded.manifest)
        try:
            open_runtime(loaded.model_bytes, loaded.manifest, self.threads)
        except ModelError as exc:
            self._emit("failed", str(exc), ref, ReasonCode.MODEL_LOAD_FAILED.value)
            raise BundleError(ReasonCode.MODEL_LOAD_FAILED, str(exc)) from None
        self.slots.switch(target)
        if self.on_activate is not None:
            self.on_activate(loaded.manifest, loaded.model_bytes)
        self._emit(
            "rolled_back",
            f"now {loaded.manifest.name} {loaded.manifest.version} "
            f"(release {loaded.manifest.release})",
            ref,
        )
        return loaded.manifest
