import PIL
import torch
from ovdistill.pipeline.cache import library_versions


def test_library_versions_record_the_image_library_and_torch_as_installed():
    versions = library_versions()
    assert versions["pillow"] == PIL.__version__  # draws the toy's images, decodes every image
    assert versions["torch"] == torch.__version__.split("+")[0]


def test_library_versions_record_the_cpu_kernels_torch_uses():
    import platform

    versions = library_versions()
    assert versions["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert versions["machine"] == platform.machine()
