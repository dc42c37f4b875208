{
  "algorithm": "ed25519",
  "key_id": "1161a59f09a16134",
  "signature": "yQPKj9nfuKT+YoCZVzufiMk7gi1pWvziHJVIMlKwprjv3r9XIAdqUy2xQFDICPYBMhU4vacxJ+gki9/W5f9JBA=="
}
