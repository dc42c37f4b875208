{
  "algorithm": "ed25519",
  "key_id": "e0aea9c631ddb94a",
  "signature": "oGcGmkwwkZ+3n8u5pSwE/mXjTe4Z5Os1KAnRvZknScpoChCdXjjAdgqqj6A26DxN+5wbQzlN5ppGnaNiorpgBg=="
}
