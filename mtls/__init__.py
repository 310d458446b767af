"""SPIFFE identity over mTLS: IDs, X.509-SVIDs, bundles, TLS contexts, sources, XFCC.

One module per concept, as in go-spiffe:

- :mod:`mtls.spiffeid`    strict SPIFFE IDs, trust domains and ID patterns
- :mod:`mtls.x509bundle`  trust bundles per trust domain
- :mod:`mtls.x509svid`    X.509-SVID verification (RFC 5280 path + X509-SVID leaf rules)
- :mod:`mtls.sources`     where a workload's own SVID and bundle come from (files, Workload API)
- :mod:`mtls.tlsconfig`   ``ssl.SSLContext`` builders for mTLS servers and clients
- :mod:`mtls.uvicorn`     uvicorn protocol classes that fill the ASGI TLS extension
- :mod:`mtls.xfcc`        Envoy's ``X-Forwarded-Client-Cert`` parser
- :mod:`mtls.devpki`      the development PKI behind ``axid certs``
- :mod:`mtls.workloadapi` a dev SPIFFE Workload API server (real gRPC, for tests and demos)

:mod:`mtls.uvicorn` and :mod:`mtls.workloadapi` are not imported here, so importing
``mtls`` does not pull in uvicorn or gRPC.
"""

from mtls.devpki import (
    DEV_WORKLOADS,
    DevCA,
    DevPki,
    DevPkiError,
    DevPkiExistsError,
    IssuedSvid,
    init_dev_pki,
    load_dev_pki,
)
from mtls.errors import MtlsError
from mtls.sources import (
    FileSource,
    SourceError,
    SvidMaterial,
    WorkloadApiSource,
    X509Source,
    svid_material_from_pem,
)
from mtls.spiffeid import (
    SpiffeId,
    SpiffeIdError,
    SpiffeIdPattern,
    TrustDomain,
    parse_spiffe_id,
    parse_trust_domain,
)
from mtls.tlsconfig import client_context, peer_chain_der, peer_chain_pem, server_context
from mtls.x509bundle import BundleError, BundleSet
from mtls.x509svid import (
    NotAnSvidError,
    SvidError,
    UntrustedSvidError,
    VerifiedSvid,
    load_chain,
    verify_svid,
    x5t_s256,
)
from mtls.xfcc import XfccElement, XfccError, last_element, parse_xfcc

__all__ = [
    "DEV_WORKLOADS",
    "BundleError",
    "BundleSet",
    "DevCA",
    "DevPki",
    "DevPkiError",
    "DevPkiExistsError",
    "FileSource",
    "IssuedSvid",
    "MtlsError",
    "NotAnSvidError",
    "SourceError",
    "SpiffeId",
    "SpiffeIdError",
    "SpiffeIdPattern",
    "SvidError",
    "SvidMaterial",
    "TrustDomain",
    "UntrustedSvidError",
    "VerifiedSvid",
    "WorkloadApiSource",
    "X509Source",
    "XfccElement",
    "XfccError",
    "client_context",
    "init_dev_pki",
    "last_element",
    "load_chain",
    "load_dev_pki",
    "parse_spiffe_id",
    "parse_trust_domain",
    "parse_xfcc",
    "peer_chain_der",
    "peer_chain_pem",
    "server_context",
    "svid_material_from_pem",
    "verify_svid",
    "x5t_s256",
]
