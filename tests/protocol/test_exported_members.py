import protocol


def test_all_exported_members_exist_and_are_unique():
    assert len(set(protocol.__all__)) == len(protocol.__all__)
    for name in protocol.__all__:
        assert hasattr(protocol, name), name


def test_importing_protocol_does_not_import_heavy_packages():
    import subprocess
    import sys

    heavy = "('sklearn', 'onnx', 'tensorflow', 'onnxruntime', 'paho', 'fastapi')"
    code = f"import protocol, sys; print(','.join(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
