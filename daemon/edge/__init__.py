"""The DICOM edge: what faces the network. server.py accepts TCP connections and guards them (limits, deadlines,
TLS handshakes, A-ASSOCIATE rejections); scp.py answers C-ECHO and C-STORE (statuses.py: which status for which
refusal); intake.py reads what a sender sent and decides whether chexd can use it; scu.py sends (C-ECHO, C-STORE)
for ``chexd echo|send`` and forwarding; tls.py builds the BCP 195 TLS contexts."""
