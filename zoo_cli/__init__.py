"""The `zoo` command line: the one package that ties the library (zoo), training and export together.

Layers, each importing only those below it: zoo < training, export < zoo_cli. One module per command
group (models, embed, evaluate, train, export, convert, bench), each with `register(subparsers)`;
`zoo_cli.main` assembles them. Heavy imports (faiss, the trainer, ONNX) stay inside the handlers so
`zoo --help` and `zoo list` start fast.
"""
