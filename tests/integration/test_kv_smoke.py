from strata.kv.v1 import kv_pb2


async def test_put_then_get_returns_the_value(kv, namespace):
    put = await kv.Put(kv_pb2.PutRequest(namespace=namespace, key="a", value=b"1"))
    got = await kv.Get(kv_pb2.GetRequest(namespace=namespace, key="a"))
    assert got.kv.value == b"1"
    assert got.kv.mod_revision == put.header.revision
