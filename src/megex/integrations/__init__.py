"""Serving megex victims, defences and monitors inside the model servers providers run: KServe (kserve.py), MLServer (mlserver.py)."""  # noqa: E501
