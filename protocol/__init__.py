"""edgefleet's shared contract: bundles, signatures, profiles, sketches, topics, messages.

No I/O here besides reading a file the caller hands in. Light dependencies only.
"""

from .bundle import (
    Bundle,
    check_files,
    check_profile,
    pack_bundle,
    read_bundle,
    sha256_hex,
    verify_bundle,
)
from .errors import (
    ArchiveError,
    BundleError,
    EdgefleetError,
    ProfileError,
    ProtocolError,
    ReasonCode,
    SignatureError,
)
from .manifest import (
    MANIFEST_NAME,
    MODEL_CARD_NAME,
    REFERENCE_SKETCH_NAME,
    SIGNATURE_NAME,
    BenchmarkResult,
    Fallback,
    FileEntry,
    Lineage,
    Manifest,
    ModelInfo,
    Quantization,
    SmokeTest,
    TargetProfile,
    canonical_bytes,
    canonical_json,
    parse_manifest,
)
from .profiles import DeviceProfile, Runtime, list_profiles, load_profile
from .schema import FeatureSpec, InputSchema, ModelInput, OutputSchema
from .signing import KeyPair, Signature, TrustStore, key_id, load_private_key, load_public_key
from .sketches import FeatureSketch, SketchBuilder, SketchSet, build_reference, merge
from .topics import Topics

__version__ = "0.1.0"

__all__ = [
    "MANIFEST_NAME",
    "MODEL_CARD_NAME",
    "REFERENCE_SKETCH_NAME",
    "SIGNATURE_NAME",
    "ArchiveError",
    "BenchmarkResult",
    "Bundle",
    "BundleError",
    "DeviceProfile",
    "EdgefleetError",
    "Fallback",
    "FeatureSketch",
    "FeatureSpec",
    "FileEntry",
    "InputSchema",
    "KeyPair",
    "Lineage",
    "Manifest",
    "ModelInfo",
    "ModelInput",
    "OutputSchema",
    "ProfileError",
    "ProtocolError",
    "Quantization",
    "ReasonCode",
    "Runtime",
    "Signature",
    "SignatureError",
    "SketchBuilder",
    "SketchSet",
    "SmokeTest",
    "TargetProfile",
    "Topics",
    "TrustStore",
    "__version__",
    "build_reference",
    "canonical_bytes",
    "canonical_json",
    "check_files",
    "check_profile",
    "key_id",
    "list_profiles",
    "load_private_key",
    "load_profile",
    "load_public_key",
    "merge",
    "pack_bundle",
    "parse_manifest",
    "read_bundle",
    "sha256_hex",
    "verify_bundle",
]
