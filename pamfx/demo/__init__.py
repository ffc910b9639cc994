"""The demo, apart from the library: the Fashion-MNIST reader and its tasks (`data`), a model zoo (`zoo`), cached
training (`training`) and the command line (`cli`, run as `python -m pamfx demo`). `import pamfx` loads none of it.
"""
