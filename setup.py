"""Package layout: kernels/, passes/ and plugins/ live at the top of the repository but install
as vsopt.kernels, vsopt.passes and vsopt.plugins (so `import kernels` fails after install)."""
from setuptools import find_packages, setup

ROOTS = {"vsopt": "vsopt", "vsopt.kernels": "kernels", "vsopt.passes": "passes", "vsopt.plugins": "plugins"}

packages, package_dir = [], {}
for name, folder in ROOTS.items():
    package_dir[name] = folder
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(folder)]

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"vsopt.models": ["assets/*"], "vsopt": ["costmodels/*.json"]},
    include_package_data=True,
)
