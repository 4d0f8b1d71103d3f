"""Every file cdq reads or writes: the output folder, one layer's stored record, the resume
journal, the report schema, the GPTQ export. File names live in :mod:`cdq_cli.store.names`.

Nothing here imports the driver or the command line; the records both sides share are in
:mod:`cdq_cli.records`.
"""
