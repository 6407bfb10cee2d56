"""A key's share of busy engines (weight, priority, max_in_flight, keep_alive): written in the
config or given to a runtime key through the admin API, kept across restarts, and shown by
`GET /admin/keys`."""

from __future__ import annotations

from pathlib import Path

from modelyard.auth.principal import ShareTerms
from modelyard.auth.runtime_keys import MIGRATIONS, KeyFields, NewKey, RuntimeKeyStore
from modelyard.state import StateDirectory
from tests.harness import engine_model, in_process_gateway
from tests.security.keys import ADMIN_KEY, bearer, key_config


def _store(path: Path) -> RuntimeKeyStore:
    return RuntimeKeyStore(StateDirectory(path).database("runtime_keys", MIGRATIONS))


async def test_a_runtime_keys_share_is_kept_across_restarts(tmp_path: Path) -> None:
    store = _store(tmp_path)
    await store.create(NewKey(name="batch", weight=0.5, priority=10), taken=[])
    await store.change("batch", KeyFields(max_in_flight=3, keep_alive=False))
    store.close()
    again = _store(tmp_path)
    key = again.get("batch")
    assert key is not None
    assert key.share == ShareTerms(weight=0.5, priority=10, max_in_flight=3, keep_alive=False)
    await again.change("batch", KeyFields(max_in_flight=0, weight=None))  # 0 or null: none again
    assert again.get("batch").share == ShareTerms(priority=10, keep_alive=False)  # type: ignore[union-attr]
    again.close()


async def test_the_admin_api_gives_and_shows_a_keys_share(tmp_path: Path) -> None:
    keys = {"keys": [key_config("ops", ADMIN_KEY, admin=True, weight=2, priority=-1)]}
    async with in_process_gateway(tmp_path, {"m": engine_model()}, auth=keys) as harness:
        client = harness.client
        made = await client.post(
            "/admin/keys", json={"name": "bot", "priority": 5}, headers=bearer(ADMIN_KEY)
        )
        assert made.status in (200, 201), await made.text()
        changed = await client.patch(
            "/admin/keys/bot", json={"weight": 0.25, "max_in_flight": 2}, headers=bearer(ADMIN_KEY)
        )
        assert changed.status == 200, await changed.text()
        listing = await (await client.get("/admin/keys", headers=bearer(ADMIN_KEY))).json()
        shown = {key["name"]: key for key in listing["keys"]}
        assert (shown["ops"]["weight"], shown["ops"]["priority"]) == (2.0, -1)
        bot = shown["bot"]
        assert (bot["weight"], bot["priority"], bot["max_in_flight"]) == (0.25, 5, 2)
        refused = await client.patch(
            "/admin/keys/bot", json={"weight": -1}, headers=bearer(ADMIN_KEY)
        )
        assert refused.status == 400
