"""/health during a drain: a load balancer must see the board leave at once."""


async def test_health_is_503_draining_once_shutdown_begins(make_client):
    async with make_client() as client:
        assert (await client.get("/health")).status_code == 200
        client.engine.scheduler.close()  # what SIGTERM does first
        health = await client.get("/health")
    assert health.status_code == 503
    assert health.json()["state"] == "draining"
