"""The upstream key pool: key specs, the pool that leases keys per call, and the shared key state.

`open_key_pool` makes the pool of one server from its key specs (`specs.KeySpec`: `OPENAI_API_KEYS`
with `OPENAI_API_KEY`, and the clients file's `[[upstream_key]]` entries): `pool.KeyPool`, which every worker of the host
shares through a file in the runtime directory (`state.KeyTable`), or no pool at all without keys.
The rest of the library sees it as `UpstreamKeys`: the upstream calls take a key per attempt and
report what each answer did to it (`openai_proxy.upstream.failover`), and `/health` and `/metrics`
describe the keys. The outcomes an attempt reports and `KeysUnavailable` are `pool`'s.

Stdlib-only imports (like every package face; DESIGN "Layout"): the gunicorn master imports
`keys.specs` and `keys.state`, and the pool is imported where it is opened.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from openai_proxy.keys.pool import Lease
    from openai_proxy.keys.specs import KeySpec


class UpstreamKeys(Protocol):
    """The upstream keys of one server, as the upstream calls, `/health` and `/metrics` use them."""

    def choose(
        self, model: str | None = None, allowed: Collection[str] | None = None, exclude: Collection[int] = ()
    ) -> Lease:
        """A lease on the usable key with the fewest calls in flight (weighted), or `KeysUnavailable`.
        `allowed`: the names the call may use (None: any); `exclude`: indexes already tried for it."""
        ...

    def choose_named(
        self, name: str, model: str | None = None, allowed: Collection[str] | None = None
    ) -> Lease:
        """A lease on the key called `name` (it holds the stored object the call is about), or
        `KeysUnavailable` saying why that key cannot take the call."""
        ...

    def report(self, index: int, outcome: str, rest_s: float | None = None) -> None:
        """What an attempt with key `index` came to (`pool.OK`, `pool.RATE_LIMITED`, ...): a 429 rests
        the key (for `rest_s`, else a back-off), a refusal revokes it, any other answer ends a back-off."""
        ...

    def describe(self) -> list[dict[str, Any]]:
        """Each key as `/health` and `/metrics` show it: name, last four characters, weight, calls in
        flight, state (active, resting, revoked) and until when."""
        ...

    def close(self) -> None: ...


def open_key_pool(specs: Sequence[KeySpec], runtime_dir: str) -> UpstreamKeys | None:
    """The pool of `specs`, shared by the workers of this server through `runtime_dir`; None without
    specs (a lone `OPENAI_API_KEY` is not pooled: every call that brings no key of its own uses it)."""
    if not specs:
        return None
    from openai_proxy.keys.pool import KeyPool

    return KeyPool(specs, runtime_dir)
