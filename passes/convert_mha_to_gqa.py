from fusegen.passes.infra import graph_pass, PassResult
@graph_pass("convert_mha_to_gqa")
def convert_mha_to_gqa(gm, ctx):
    raise NotImplementedError
