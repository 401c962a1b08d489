"""The marks transformers' common test files use (the library registers them in its own conftest)."""

LIBRARY_MARKS = ("accelerate_tests", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test", "torch_compile_test")


def pytest_configure(config):
    for mark in LIBRARY_MARKS:
        config.addinivalue_line("markers", f"{mark}: a mark of transformers' common tests")
