import geoopt_sgd


def test_every_public_name_imports_and_is_documented():
    for name in geoopt_sgd.__all__:
        obj = getattr(geoopt_sgd, name)
        if name == "__version__":
            assert isinstance(obj, str)
            continue
        assert obj.__doc__ and obj.__doc__.strip(), f"{name} has no docstring"
