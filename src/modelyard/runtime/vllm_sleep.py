"""vLLM's sleep mode over HTTP: `POST /sleep?level=N`, `POST /wake_up`, `GET /is_sleeping`.

These endpoints exist when vLLM runs with `--enable-sleep-mode` and VLLM_SERVER_DEV_MODE=1
(GPU builds only). `/sleep` aborts requests in flight, so the supervisor drains first.
"""

from __future__ import annotations

import aiohttp

SLEEP_TIMEOUT_S = 120.0


class SleepError(Exception):
    pass


class VllmSleepControl:
    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def sleep(self, base_url: str, level: int) -> None:
        await self._post(f"{base_url}/sleep?level={level}")
        if not await self.is_sleeping(base_url):
            raise SleepError("engine accepted /sleep but does not report sleeping")

    async def wake(self, base_url: str) -> None:
        await self._post(f"{base_url}/wake_up")
        if await self.is_sleeping(base_url):
            raise SleepError("engine accepted /wake_up but still reports sleeping")

    async def is_sleeping(self, base_url: str) -> bool:
        timeout = aiohttp.ClientTimeout(total=10)
        async with self._session.get(f"{base_url}/is_sleeping", timeout=timeout) as response:
            if response.status != 200:
                raise SleepError(f"GET /is_sleeping answered {response.status}")
            body = await response.json(content_type=None)
        return bool(body.get("is_sleeping"))

    async def _post(self, url: str) -> None:
        timeout = aiohttp.ClientTimeout(total=SLEEP_TIMEOUT_S)
        try:
            async with self._session.post(url, timeout=timeout) as response:
                if response.status >= 400:
                    text = (await response.text())[:300]
                    raise SleepError(f"{url.rsplit('/', 1)[-1]} answered {response.status}: {text}")
        except (aiohttp.ClientError, TimeoutError) as error:
            raise SleepError(f"{url.rsplit('/', 1)[-1]} failed: {error}") from error
