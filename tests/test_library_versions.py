import PIL
import torch
from ovdistill.pipeline.cache import library_versions


def test_library_versions_record_the_image_library_and_torch_as_installed():
    versions = library_versions()
    assert versions["pillow"] == PIL.__version__  # draws the toy's images, decodes every image
    assert versions["torch"] == torch.__version__.split("+")[0]
