"""The `slow` marker of the Stage 3 hand-off tests (a real predict run, TerraTorch training): they run in
`make test`; `pytest -m "not slow"` leaves them out for a quick round."""


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs a model (predict or a TerraTorch training step); part of make test")
