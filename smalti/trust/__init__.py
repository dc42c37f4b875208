"""The trust primitives: keys (files and PKCS#11 tokens), the signed taxonomy and policy, Merkle trees, C2SP
signed notes and ledger entries. Data, models and the ledger are built on them; they import nothing above
``smalti.core``."""
