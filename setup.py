"""pip-installable part of orcnn_ros: the ROS-free library ``orcnn_core`` and ``orcnn-core``.

The ROS 2 node and its messages are built with colcon (see CMakeLists.txt and README.md).
"""

from setuptools import find_packages, setup

setup(
    name="orcnn-core",
    version="0.1.0",
    description="ORCNN amodal instance segmentation (amodal, visible and occlusion masks)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["orcnn_core", "orcnn_core.*"]),
    package_data={"orcnn_core": ["configs/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "numpy>=1.24",
        "opencv-python-headless>=4.8",
        "pycocotools>=2.0.7",
        "safetensors>=0.4",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "tensorboard>=2.14",
    ],
    entry_points={"console_scripts": ["orcnn-core = orcnn_core.cli:main"]},
)
