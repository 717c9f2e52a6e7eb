// The tidegate challenge form: static or dynamic scoring. Inputs of the
// hidden choice are disabled so that the form does not send them.
CTFd.plugin.run(function (_CTFd) {
  var $ = _CTFd.lib.$;
  function apply() {
    var dynamic = $("#tidegate-scoring").val() !== "static";
    $(".tidegate-static").toggle(!dynamic);
    $(".tidegate-static input").prop("disabled", dynamic).prop("required", !dynamic);
    $(".tidegate-dynamic").toggle(dynamic);
    $(".tidegate-dynamic input").prop("disabled", !dynamic).prop("required", dynamic);
  }
  $("#tidegate-scoring").off("change.tidegate").on("change.tidegate", apply);
  apply();
});
