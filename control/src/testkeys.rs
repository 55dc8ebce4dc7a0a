//! Throwaway keys for tests only (generated with ssh-keygen for this purpose, used nowhere else).

/// An ed25519 public key line with a comment.
pub(crate) const USER_PUB: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPRX/qxb5qjr+CHLnlaeYt5gjKJoz4McrSoBfFL8+fTq alice@laptop";

/// The unencrypted private key matching [`USER_PUB`].
pub(crate) const USER_PRIV: &str = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\nQyNTUxOQAAACD0V/6sW+ao6/ghy55WnmLeYIyiaM+DHK0qAXxS/Pn06gAAAJCocuIBqHLi\nAQAAAAtzc2gtZWQyNTUxOQAAACD0V/6sW+ao6/ghy55WnmLeYIyiaM+DHK0qAXxS/Pn06g\nAAAEAXaAkj3yM1Cp5thOp5hlxNYacT41FeOsUIsN2lobZLrvRX/qxb5qjr+CHLnlaeYt5g\njKJoz4McrSoBfFL8+fTqAAAADGFsaWNlQGxhcHRvcAE=\n-----END OPENSSH PRIVATE KEY-----\n";

/// An ed25519 private key encrypted with the passphrase `pw`.
pub(crate) const ENCRYPTED_PRIV: &str = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAACmFlczI1Ni1jdHIAAAAGYmNyeXB0AAAAGAAAABDj/zpsuz\nBtbkZjtjpxm7z4AAAAEAAAAAEAAAAzAAAAC3NzaC1lZDI1NTE5AAAAIJbqSyQuQnd9l2BD\nRdaJ5FQP7ppFRTUSZ4ZDfF5fA1vLAAAAkBTto7RQhZoKh2vrUIEYX2fB1Y0UxY4cJ8pl/X\nVsCWLRvP6OrCv/Z4w32C/OXDU2uEpakRWVjncEw4eUdS8QMcJtyke1/j593ul6WIIAMyNK\n4JswxEWRcjN9OAyMJm3DKE4V4W6MLZXmJXyLDkhSMUmBPfQWVatPcwlmXtzBlZ8hUFymq8\nR0fkBNChch7P/wPQ==\n-----END OPENSSH PRIVATE KEY-----\n";

/// Another ed25519 public key (no comment), e.g. a rotated host key.
pub(crate) const OTHER_PUB: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAUQ+n0vyu4msa1VPJrPj4/9qptaFSpSCTPm5VHKmY4R";
