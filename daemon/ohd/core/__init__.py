"""Pure rules of the product: task files and types, routing and selection, Python parsing, the
alarm and the views. No I/O beyond reading what is handed in.
"""
