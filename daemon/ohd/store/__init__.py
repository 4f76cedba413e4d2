"""The store, the truth: the schema, its migrations, transactions, the call history, measured
history, standing rules' rows and quotas.
"""
